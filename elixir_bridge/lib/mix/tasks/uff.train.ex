defmodule Mix.Tasks.Uff.Train do
  @shortdoc "Trains through a supervised uff-port worker, printing progress"
  @moduledoc """
  Trains one job through `UffPort.TrainingCoordinator` (a supervisor, the
  worker, restart-and-resume) and prints progress as it goes.

      mix uff.train --config configs/tiny.yaml
      mix uff.train --config configs/tiny.yaml --inject-crash-at 30

  ## Options

    * `--config PATH` (required) - YAML file (relative to here or to the
      repository root) or a preset name such as `tiny`.
    * `--strategy local|kaggle|sagemaker|hybrid` (default `local`).
    * `--run-dir DIR` - run directory under the runs root (default `bridge-<time>`).
    * `--runs-root DIR` - default `runs/` at the repository root.
    * `--data PATH` - overrides `data.path`.
    * `--max-steps N` - overrides `training.max_steps`.
    * `--inject-crash-at STEP` - SIGKILL the worker at STEP; the supervisor
      restarts it and the run resumes. Then an uncrashed reference run is made
      in `<run-dir>-reference` from the crashed run's resolved `config.yaml`,
      and the summary compares final step and loss
      (skip it with `--no-reference`). Exits 1 if they differ.
    * `--python PATH` - interpreter with uff-port (default `$UFF_PORT_PYTHON`, else
      the repository's `.venv`).
    * `--heartbeat-interval S` (default 1.0).
  """

  use Mix.Task

  alias UffPort.TrainingCoordinator

  @switches [
    config: :string,
    strategy: :string,
    run_dir: :string,
    runs_root: :string,
    data: :string,
    max_steps: :integer,
    inject_crash_at: :integer,
    reference: :boolean,
    python: :string,
    heartbeat_interval: :float
  ]

  @impl true
  def run(argv) do
    {opts, rest, invalid} = OptionParser.parse(argv, strict: @switches)

    if rest != [] or invalid != [] or is_nil(opts[:config]) do
      Mix.raise(
        "usage: mix uff.train --config PATH [--strategy local] [--run-dir DIR] [--inject-crash-at STEP]" <>
          if(invalid != [], do: " (bad options: #{inspect(invalid)})", else: "")
      )
    end

    Mix.Task.run("compile")
    # The task prints its own account of every crash (with the stderr tail); the
    # injected SIGKILL is expected, so the logger's crash reports would only repeat it.
    Logger.configure(level: :critical)
    strategy = parse_strategy(opts[:strategy] || "local")
    repo = repo_root()
    run_dir = opts[:run_dir] || "bridge-" <> timestamp()
    crash_at = opts[:inject_crash_at]

    base = [
      config: resolve_config(opts[:config], repo),
      overrides: overrides(opts),
      worker:
        [
          runs_root: opts[:runs_root] || Path.join(repo, "runs"),
          heartbeat_interval: opts[:heartbeat_interval] || 1.0,
          cd: repo,
          stderr_log:
            Path.join([opts[:runs_root] || Path.join(repo, "runs"), run_dir <> ".worker.log"])
        ] ++ python_opt(opts[:python], repo)
    ]

    shell = Mix.shell()

    shell.info(
      "uff.train: #{base[:config]} (#{strategy}) -> run #{run_dir}" <> crash_note(crash_at)
    )

    {:ok, crashed} =
      run_cycle(
        Keyword.merge(base, run_dir: run_dir, inject_crash_at: crash_at, on_event: &print_event/2),
        strategy
      )

    reference =
      if crash_at && Keyword.get(opts, :reference, true) do
        shell.info("\nuff.train: reference run without a crash -> run #{run_dir}-reference")

        # The crashed run's resolved config, so a config file edited meanwhile cannot
        # make the comparison meaningless.
        same = [config: Path.join(crashed.run_dir, "config.yaml"), overrides: %{}]

        {:ok, ref} =
          run_cycle(
            Keyword.merge(
              base,
              same ++ [run_dir: run_dir <> "-reference", on_event: &print_event/2]
            ),
            strategy
          )

        ref
      end

    ok? = print_summary(crashed, reference)
    unless ok?, do: exit({:shutdown, 1})
  end

  defp run_cycle(opts, strategy) do
    case TrainingCoordinator.run_training_cycle(nil, strategy, opts) do
      {:ok, summary} ->
        {:ok, summary}

      {:error, {reason, summary}} ->
        Mix.raise("training failed: #{inspect(reason)}\n#{inspect(summary, pretty: true)}")
    end
  end

  # ---------------------------------------------------------------- printing

  defp print_event(attempt, %{"event" => "progress"} = ev) do
    IO.puts(
      "  [attempt #{attempt}] step #{ev["step"]}/#{ev["max_steps"]}  loss #{fmt(ev["loss"])}  " <>
        "lr #{fmt(ev["lr"], 2)}  #{round_num(ev["tokens_per_s"])} tok/s"
    )
  end

  defp print_event(_attempt, %{
         "event" => "job_started",
         "attempt" => n,
         "os_pid" => pid,
         "result" => r
       }) do
    from =
      if r["resumed_from"], do: "resuming from step #{r["resumed_from"]}", else: "fresh start"

    IO.puts("  [attempt #{n}] worker os pid #{pid}: job #{r["job_id"]} accepted, #{from}")
  end

  defp print_event(attempt, %{"event" => "checkpoint"} = ev),
    do:
      IO.puts("  [attempt #{attempt}] checkpoint at step #{ev["step"]} is durable: #{ev["path"]}")

  defp print_event(attempt, %{"event" => "eval"} = ev),
    do: IO.puts("  [attempt #{attempt}] eval at step #{ev["step"]}: loss #{fmt(ev["loss"])}")

  defp print_event(_attempt, %{"event" => "worker_down", "attempt" => n, "reason" => reason} = ev) do
    IO.puts("  [attempt #{n}] worker down: #{describe(reason)}")

    unless match?({:worker_crashed, %{signal: 9}}, reason) or reason == :normal or
             match?({:shutdown, _}, reason) do
      for line <- Enum.take(ev["stderr"] || [], -8), do: IO.puts("      stderr| #{line}")
    end
  end

  defp print_event(_attempt, _ev), do: :ok

  defp print_summary(run, reference) do
    IO.puts("\n== summary: run #{run.run_dir} ==")
    IO.puts("attempts: #{length(run.attempts)}")

    for a <- run.attempts do
      start = if a.resumed_from, do: "resumed from step #{a.resumed_from}", else: "fresh"

      IO.puts(
        "  attempt #{a.attempt}: os pid #{a.os_pid}, #{start}, progress steps #{a.first_step}..#{a.last_step}, " <>
          "ended: #{if a.down, do: describe(a.down), else: "finished"}"
      )
    end

    if run.injected_at, do: IO.puts("crash injected: SIGKILL at step #{run.injected_at}")

    if run.recovery_ms,
      do: IO.puts("recovery: SIGKILL -> first progress after resume in #{run.recovery_ms} ms")

    IO.puts("final: step #{run.final_step}, loss #{run.final_loss}, eval loss #{run.eval_loss}")

    case reference do
      nil ->
        true

      ref ->
        IO.puts("reference without crash: step #{ref.final_step}, loss #{ref.final_loss}")
        same_step? = ref.final_step == run.final_step

        diff =
          if is_number(ref.final_loss) and is_number(run.final_loss),
            do: abs(ref.final_loss - run.final_loss)

        # Exact resume makes them bit-identical; the tolerance only absorbs float printing.
        same_loss? = diff != nil and diff <= 1.0e-9 * max(1.0, abs(ref.final_loss))

        IO.puts(
          "match: final step #{verdict(same_step?)}, final loss #{verdict(same_loss?)} (|diff| = #{diff})"
        )

        same_step? and same_loss?
    end
  end

  defp verdict(true), do: "equal"
  defp verdict(false), do: "DIFFERENT"

  defp describe({:worker_crashed, %{status: s, signal: 9}}),
    do: "killed by SIGKILL (exit status #{s}); supervisor restarts it"

  defp describe({:worker_crashed, %{status: s, signal: sig}}) when is_integer(sig),
    do: "killed by signal #{sig} (status #{s})"

  defp describe({:worker_crashed, %{status: nil, port_closed: r}}),
    do: "exited (status unknown: its pipe closed with #{inspect(r)})"

  defp describe({:worker_crashed, %{status: s}}), do: "crashed with exit status #{s}"
  defp describe(:normal), do: "exited normally"
  defp describe(other), do: inspect(other, limit: 8)

  defp fmt(x, digits \\ 4)

  defp fmt(x, digits) when is_float(x),
    do: :erlang.float_to_binary(x, [{:decimals, digits}, :compact]) |> sci(x)

  defp fmt(x, _), do: inspect(x)

  defp sci(_, x) when abs(x) < 0.01 and x != 0.0, do: :io_lib.format("~.2e", [x]) |> to_string()
  defp sci(s, _), do: s

  defp round_num(x) when is_number(x), do: round(x)
  defp round_num(x), do: inspect(x)

  defp crash_note(nil), do: ""
  defp crash_note(step), do: ", crash injected at step #{step}"

  # ---------------------------------------------------------------- options

  defp parse_strategy(s) when s in ~w(local kaggle sagemaker hybrid), do: String.to_atom(s)

  defp parse_strategy(s),
    do: Mix.raise("--strategy must be local, kaggle, sagemaker or hybrid, got #{inspect(s)}")

  defp overrides(opts) do
    # With a crash drill, a progress event per step, so the kill lands at the exact step.
    if(opts[:inject_crash_at], do: %{"training.progress_every_seconds" => 0}, else: %{})
    |> then(fn o ->
      if opts[:data], do: Map.put(o, "data.path", Path.expand(opts[:data])), else: o
    end)
    |> then(fn o ->
      if opts[:max_steps], do: Map.put(o, "training.max_steps", opts[:max_steps]), else: o
    end)
  end

  # --python, then $UFF_PORT_PYTHON, then the repository's own venv (scripts/bootstrap.sh makes it).
  defp python_opt(nil, repo) do
    venv = Path.join(repo, ".venv/bin/python")

    if is_nil(System.get_env("UFF_PORT_PYTHON")) and File.regular?(venv),
      do: [python: venv],
      else: []
  end

  defp python_opt(python, _repo), do: [python: python]

  defp repo_root do
    parent = Path.expand("..")
    if File.exists?(Path.join(parent, "pyproject.toml")), do: parent, else: File.cwd!()
  end

  # The worker runs elsewhere, so a file path is made absolute; a preset name passes through.
  defp resolve_config(path, repo) do
    cond do
      File.regular?(path) -> Path.expand(path)
      File.regular?(Path.join(repo, path)) -> Path.join(repo, path)
      true -> path
    end
  end

  defp timestamp do
    {{y, mo, d}, {h, mi, s}} = :calendar.universal_time()
    :io_lib.format("~4..0B~2..0B~2..0B-~2..0B~2..0B~2..0B", [y, mo, d, h, mi, s]) |> to_string()
  end
end
