defmodule UffPort.CampaignSupervisor do
  @moduledoc """
  Supervises one `UffPort.Campaign`. The campaign is `:transient`: a crash (or a
  kill) restarts it, it replays its journal and goes on; a campaign that refused
  to start (invalid spec) or finished is not restarted. Its job runners and
  workers are linked to it, so they stop with it and the replay re-attaches.

  Options: those of `UffPort.Campaign`, plus `:max_restarts` (10) in
  `:max_seconds` (60) and `:name`.
  """

  use Supervisor

  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(opts) do
    Keyword.get(opts, :spec_path) ||
      raise ArgumentError, "UffPort.CampaignSupervisor needs :spec_path"

    Supervisor.start_link(__MODULE__, opts, Keyword.take(opts, [:name]))
  end

  @impl true
  def init(opts) do
    campaign = Keyword.drop(opts, [:name, :max_restarts, :max_seconds])

    Supervisor.init([{UffPort.Campaign, campaign}],
      strategy: :one_for_one,
      max_restarts: Keyword.get(opts, :max_restarts, 10),
      max_seconds: Keyword.get(opts, :max_seconds, 60)
    )
  end

  @doc "The running campaign's pid, or nil while it restarts."
  @spec campaign(Supervisor.supervisor()) :: pid | nil
  def campaign(sup) do
    Enum.find_value(Supervisor.which_children(sup), fn
      {UffPort.Campaign, pid, _, _} when is_pid(pid) -> pid
      _ -> nil
    end)
  end
end
