defmodule Mix.Tasks.Uff.Campaign do
  @shortdoc "Runs a training campaign (the week) or shows its status"
  @moduledoc """
  Runs a campaign spec through `UffPort.TrainingCoordinator.run_campaign/2`,
  or shows a campaign's status from its journal (docs/campaign.md).

      mix uff.campaign run week.yaml --runs-root ../runs
      mix uff.campaign status ../runs/campaigns/week-48

  ## Options (run)

    * `--runs-root DIR` - default `runs`.
    * `--python PATH` - interpreter with uff-port (default `$UFF_PORT_PYTHON`).
    * `--heartbeat-interval S` (default 1.0), `--quiet`.

  Started again after any crash with the same spec, it continues where the
  journal says it was.
  """

  use Mix.Task

  @impl true
  def run(argv) do
    Mix.Task.run("compile")
    Mix.Task.run("app.start")

    case UffPort.CampaignCLI.main(argv) do
      0 -> :ok
      code -> exit({:shutdown, code})
    end
  end
end
