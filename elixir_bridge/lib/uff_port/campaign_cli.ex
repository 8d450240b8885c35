defmodule UffPort.CampaignCLI do
  @moduledoc """
  `mix uff.campaign run SPEC` and `mix uff.campaign status DIR`, callable
  without Mix too (`elixir -pa EBIN script.exs run SPEC`): the crash drills
  restart a whole VM running this.

      run SPEC [--runs-root DIR] [--python PATH] [--heartbeat-interval S] [--quiet]
      status DIR

  `run` prints each transition and exits 0 when the campaign finished (every
  job promoted, refused, failed or skipped: see the table), 1 when it could not
  run (an invalid spec: every problem listed). `status` reads the journal only.
  """

  alias UffPort.{Campaign, CampaignJournal, TrainingCoordinator}

  @switches [runs_root: :string, python: :string, heartbeat_interval: :float, quiet: :boolean]

  @spec main([String.t()]) :: non_neg_integer
  def main(["run", spec | rest]) do
    {opts, _, invalid} = OptionParser.parse(rest, strict: @switches)
    if invalid != [], do: usage("bad options #{inspect(invalid)}")

    worker =
      [
        runs_root: Path.expand(opts[:runs_root] || "runs"),
        heartbeat_interval: opts[:heartbeat_interval] || 1.0
      ]
      |> then(fn w -> if p = opts[:python], do: Keyword.put(w, :python, p), else: w end)

    printer = spawn_link(fn -> print_loop(opts[:quiet]) end)

    case TrainingCoordinator.run_campaign(spec, worker: worker, subscribers: [printer]) do
      {:ok, ev} ->
        IO.puts(table(ev["details"] || %{}))

        if rel = ev["release"],
          do:
            IO.puts(
              "release: #{rel["name"] || rel["state"]} #{rel["path"] || rel["reason"] || ""}"
            )

        0

      {:error, {:campaign_stopped, ev}} ->
        IO.puts(:stderr, "campaign refused: #{ev["reason"]}")
        1

      {:error, reason} ->
        IO.puts(:stderr, "campaign stopped: #{inspect(reason, limit: 20)}")
        1
    end
  end

  def main(["status", dir | _]) do
    case CampaignJournal.read(dir) do
      {:ok, records, torn} ->
        folded = Campaign.fold(records)

        details =
          Map.new(folded.jobs, fn {n, j} ->
            {n, Map.merge(j.info, %{"state" => j.state, "plan" => j.plan})}
          end)

        IO.puts(table(details, folded.order))
        IO.puts(hours(records, folded))

        if r = folded.release,
          do:
            IO.puts("release: #{r["state"]} #{r["name"] || ""} #{r["path"] || r["reason"] || ""}")

        if torn > 0, do: IO.puts("(a torn last record of #{torn} bytes is ignored)")
        0

      {:error, reason} ->
        IO.puts(:stderr, "campaign status: #{inspect(reason)}")
        1
    end
  end

  def main(_), do: usage(nil)

  defp usage(why) do
    IO.puts(
      :stderr,
      "usage: uff.campaign run SPEC [--runs-root DIR] [--python PATH] | status DIR" <>
        if(why, do: " (#{why})", else: "")
    )

    2
  end

  defp print_loop(quiet) do
    receive do
      {:uff_campaign, _n, %{"event" => "campaign_transition"}} ->
        print_loop(quiet)

      {:uff_campaign, _n, %{"event" => ev} = e} ->
        unless quiet,
          do: IO.puts("#{ev} #{e["job"] || ""} #{e["reason"] || e["artifact_id"] || ""}")

        print_loop(quiet)
    end
  end

  @doc "A plain-text table of jobs: name, role, backend, state, step/max, verdict, reason."
  @spec table(map, [String.t()] | nil) :: String.t()
  def table(details, order \\ nil) do
    order = order || Enum.sort(Map.keys(details))
    head = ["job", "role", "backend", "state", "step", "reason"]

    rows =
      for n <- order, d = details[n] do
        plan = d["plan"] || %{}

        [
          n,
          plan["role"] || "",
          plan["backend"] || "",
          d["state"] || "",
          "#{d["step"] || "-"}/#{plan["max_steps"] || "?"}",
          String.slice(to_string(d["reason"] || ""), 0, 70)
        ]
      end

    widths =
      Enum.map(0..5, fn i -> Enum.max(Enum.map([head | rows], &String.length(Enum.at(&1, i)))) end)

    fmt = fn row ->
      Enum.zip(row, widths) |> Enum.map_join("  ", fn {c, w} -> String.pad_trailing(c, w) end)
    end

    Enum.map_join([head | rows], "\n", fmt)
  end

  # GPU-hours per backend: each `training` phase until the job's next phase (or the next start).
  defp hours(records, folded) do
    {used, open, _} =
      Enum.reduce(records, {%{}, %{}, 0.0}, fn rec, {used, open, last} ->
        t = rec["t"] || last

        case rec do
          %{"kind" => "campaign_started"} ->
            {close_all(used, open, last, folded), %{}, t}

          %{"kind" => "job", "job" => j, "state" => s} when is_binary(s) ->
            used = close(used, open, j, t, folded)

            open =
              if s in ["training", "training_rl"],
                do: Map.put(open, j, t),
                else: Map.delete(open, j)

            {used, open, t}

          _ ->
            {used, open, t}
        end
      end)

    now = System.os_time(:millisecond) / 1000
    used = close_all(used, open, now, folded)

    budgets =
      Enum.find_value(records, %{}, fn r -> r["kind"] == "campaign_started" && r["budgets"] end)

    "GPU-hours: " <>
      Enum.map_join(~w(local kaggle sagemaker), ", ", fn b ->
        limit =
          case b do
            "kaggle" -> " of #{budgets["kaggle_hours_per_week"] || "?"} h/week"
            "sagemaker" -> " of #{budgets["sagemaker_hours_per_day"] || "?"} h/day"
            _ -> ""
          end

        "#{b} #{:erlang.float_to_binary(Map.get(used, b, 0.0) / 1, decimals: 3)} h#{limit}"
      end)
  end

  defp close(used, open, j, t, folded) do
    case open do
      %{^j => t0} ->
        backend = get_in(folded.jobs, [j, :plan, "backend"]) || "?"
        Map.update(used, backend, (t - t0) / 3600, &(&1 + (t - t0) / 3600))

      _ ->
        used
    end
  end

  defp close_all(used, open, t, folded),
    do: Enum.reduce(Map.keys(open), used, &close(&2, open, &1, t, folded))
end
