# Round-trip and recovery figures of the bridge, each against a baseline measured
# in the same invocation.
#
#   cd elixir_bridge && mix run bench/roundtrip.exs [--pings 2000] [--rounds 5] [--no-recovery]
#
# 1. `UffPort.Worker.ping/1` p50/p99 vs a bare Port echo: the same Python, the
#    same {packet,4} framing and the same Elixir codec work, but no GenServer and
#    no worker dispatch. Samples alternate one by one, so machine load hits both alike;
#    each of --rounds rounds gives a p50 ratio, reported as the median and the spread.
# 2. Recovery: SIGKILL of the worker at step 8 of the tiny run -> first progress
#    event after the supervisor's restart and resume, vs the cold start of the same
#    run (supervisor start -> first progress).

alias UffPort.{JobSupervisor, Msgpack, OsProcess, Worker}
# The injected SIGKILL is expected; its crash report would only clutter the figures.
Logger.configure(level: :critical)

{opts, _, _} =
  OptionParser.parse(System.argv(),
    strict: [pings: :integer, rounds: :integer, recovery: :boolean]
  )

pings = Keyword.get(opts, :pings, 2_000)
rounds = Keyword.get(opts, :rounds, 5)
repo = Path.expand("..", File.cwd!())

python =
  System.get_env("UFF_PORT_PYTHON") ||
    Enum.find([Path.join(repo, ".venv/bin/python")], &File.regular?/1) || "python3"

fake = Path.expand("test/support/fake_worker.py")
tmp = Path.join(System.tmp_dir!(), "uff_port_bench_#{System.unique_integer([:positive])}")
File.mkdir_p!(tmp)

defmodule Bench do
  def pct(samples, p) do
    sorted = Enum.sort(samples)
    Enum.at(sorted, min(length(sorted) - 1, round(p / 100 * (length(sorted) - 1))))
  end

  def echo_rtt(port, id) do
    frame = Msgpack.encode!(%{"id" => id, "cmd" => "ping", "args" => %{}})
    t0 = System.monotonic_time(:microsecond)
    true = Port.command(port, frame)

    receive do
      {^port, {:data, data}} ->
        {:ok, %{"id" => ^id}} = Msgpack.decode(data)
        System.monotonic_time(:microsecond) - t0
    after
      10_000 -> raise "echo timed out"
    end
  end

  def ping_rtt(w) do
    t0 = System.monotonic_time(:microsecond)
    {:ok, %{"pong" => true}} = Worker.ping(w)
    System.monotonic_time(:microsecond) - t0
  end

  def await(pred, timeout \\ 300_000) do
    receive do
      {:uff_port, _w, ev} ->
        if pred.(ev), do: {ev, System.monotonic_time(:millisecond)}, else: await(pred, timeout)
    after
      timeout -> raise "bench: event not seen in #{timeout} ms"
    end
  end
end

# ------------------------------------------------------------------ round trips
echo =
  Port.open({:spawn_executable, python}, [
    :binary,
    {:packet, 4},
    :exit_status,
    {:args, [fake, "echo"]}
  ])

{:ok, w} =
  Worker.start_link(
    python: python,
    runs_root: Path.join(tmp, "runs"),
    stderr_log: Path.join(tmp, "w.log")
  )

for i <- 1..200, do: {Bench.echo_rtt(echo, i), Bench.ping_rtt(w)}

# Alternate one echo and one ping per iteration: both see the same machine load.
per_round =
  for r <- 1..rounds do
    1..pings
    |> Enum.map(fn i -> {Bench.echo_rtt(echo, r * 1_000_000 + i), Bench.ping_rtt(w)} end)
    |> Enum.unzip()
  end

Port.close(echo)
Worker.shutdown(w)

row = fn name, s -> "| #{name} | #{length(s)} | #{Bench.pct(s, 50)} | #{Bench.pct(s, 99)} |" end
IO.puts("\n## ping round trip (microseconds), per round\n")
IO.puts("| round | echo p50 | ping p50 | ratio p50 |\n|---|---|---|---|")

ratios =
  for {{echo_s, ping_s}, r} <- Enum.with_index(per_round, 1) do
    ratio = Bench.pct(ping_s, 50) / max(Bench.pct(echo_s, 50), 1)

    IO.puts(
      "| #{r} | #{Bench.pct(echo_s, 50)} | #{Bench.pct(ping_s, 50)} | #{Float.round(ratio, 2)}x |"
    )

    ratio
  end

{all_echo, all_ping} =
  {Enum.flat_map(per_round, &elem(&1, 0)), Enum.flat_map(per_round, &elem(&1, 1))}

IO.puts("\n| path | n | p50 | p99 |\n|---|---|---|---|")
IO.puts(row.("bare Port echo (baseline)", all_echo))
IO.puts(row.("UffPort.Worker.ping/1", all_ping))

IO.puts(
  "\nratio worker/echo p50: median #{Float.round(Bench.pct(ratios, 50), 2)}x over #{rounds} rounds " <>
    "(#{Float.round(Enum.min(ratios), 2)}-#{Float.round(Enum.max(ratios), 2)}x)"
)

# ------------------------------------------------------------------ recovery
if Keyword.get(opts, :recovery, true) do
  job = %{
    "config_path" => Path.join(repo, "configs/tiny.yaml"),
    "run_dir" => "recovery",
    "overrides" => %{
      "training.max_steps" => 14,
      "checkpoint.every_steps" => 4,
      "eval.every_steps" => 1000,
      "training.progress_every_seconds" => 0
    }
  }

  t_start = System.monotonic_time(:millisecond)

  {:ok, sup} =
    JobSupervisor.start_link(
      job: job,
      worker: [
        python: python,
        runs_root: Path.join(tmp, "runs"),
        stderr_log: Path.join(tmp, "recovery.log"),
        subscribers: [self()],
        heartbeat_interval: 1.0
      ]
    )

  {_, t_first} = Bench.await(&(&1["event"] == "progress"))
  hello = Worker.snapshot(JobSupervisor.worker(sup)).hello
  {_, _} = Bench.await(&(&1["event"] == "progress" and &1["step"] >= 8))
  t_kill = System.monotonic_time(:millisecond)
  :ok = OsProcess.signal(hello["pid"], :kill)
  {_, t_hello} = Bench.await(&(&1["event"] == "hello" and &1["attempt"] == 2))
  {started, t_accepted} = Bench.await(&(&1["event"] == "job_started" and &1["attempt"] == 2))
  {_, t_resumed} = Bench.await(&(&1["event"] == "progress"))
  Bench.await(&(&1["event"] == "finished"))
  Supervisor.stop(sup)

  cold = t_first - t_start
  recovery = t_resumed - t_kill
  IO.puts("\n## recovery (milliseconds)\n")
  IO.puts("| phase | ms |\n|---|---|")
  IO.puts("| cold start: supervisor start -> first progress (baseline) | #{cold} |")
  IO.puts("| SIGKILL -> new worker's hello | #{t_hello - t_kill} |")

  IO.puts(
    "| hello -> train accepted (resumed_from #{started["result"]["resumed_from"]}) | #{t_accepted - t_hello} |"
  )

  IO.puts("| accepted -> first progress after resume | #{t_resumed - t_accepted} |")
  IO.puts("| **SIGKILL -> first progress after resume** | **#{recovery}** |")
  IO.puts("\nratio recovery/cold start: #{Float.round(recovery / cold, 2)}x")
end

File.rm_rf(tmp)
