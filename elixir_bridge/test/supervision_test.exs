defmodule UffPort.SupervisionTest do
  use ExUnit.Case, async: false

  import UffPort.Test.Helpers
  alias UffPort.{JobSupervisor, OsProcess, Worker}

  setup do
    tmp = tmp_dir!("sup")
    on_exit(fn -> File.rm_rf(tmp) end)
    {:ok, tmp: tmp}
  end

  test "a worker frozen with SIGSTOP is caught by the heartbeat watchdog and replaced", %{
    tmp: tmp
  } do
    opts = worker_opts(tmp, name: :frozen_worker, subscribers: [self()], heartbeat_timeout: 1_500)

    start_supervised!(%{
      id: :sup,
      start: {Supervisor, :start_link, [[{Worker, opts}], [strategy: :one_for_one]]}
    })

    first = await_event(%{"event" => "hello"})
    await_event(%{"event" => "heartbeat"}, 3_000)
    frozen_at = System.monotonic_time(:millisecond)
    :ok = OsProcess.signal(first["pid"], :stop)

    down = await_event(%{"event" => "worker_down"}, 6_000)
    detected_ms = System.monotonic_time(:millisecond) - frozen_at
    assert {:heartbeat_timeout, %{timeout_ms: 1_500}} = down["reason"]
    # timeout + one watchdog period (timeout / 5) + scheduling slack on a busy machine
    assert detected_ms < 1_500 + 300 + 1_500, "detected after #{detected_ms} ms"
    assert gone?(first["pid"], 5_000)

    second = await_event(%{"event" => "hello"}, 15_000)
    assert second["pid"] != first["pid"]
    assert {:ok, %{"pong" => true}} = Worker.ping(:frozen_worker)
  end

  test "a worker that dies right after start is restarted with backoff until intensity is exceeded",
       %{tmp: tmp} do
    Process.flag(:trap_exit, true)

    {:ok, sup} =
      JobSupervisor.start_link(
        job: %{"config_path" => "tiny"},
        worker:
          fake("crash_after_hello") ++
            [subscribers: [self()], stderr_log: Path.join(tmp, "crash.log")],
        max_restarts: 3,
        max_seconds: 60,
        backoff: [base: 150, max: 10_000, healthy_after: 30_000]
      )

    starts =
      for attempt <- 1..4 do
        hello = await_event(%{"event" => "hello"}, 10_000)
        assert hello["attempt"] == attempt
        down = await_event(%{"event" => "worker_down"}, 10_000)
        assert {:worker_crashed, %{status: 3, stderr: stderr}} = down["reason"]
        assert Enum.any?(stderr, &(&1 =~ "simulated CUDA error"))
        System.monotonic_time(:millisecond)
      end

    # Restart intensity exceeded: the supervisor gives up instead of spinning.
    assert_receive {:EXIT, ^sup, :shutdown}, 5_000
    gaps = starts |> Enum.chunk_every(2, 1, :discard) |> Enum.map(fn [a, b] -> b - a end)
    # backoff 150, 300, 600 ms before attempts 2, 3, 4
    for {gap, min} <- Enum.zip(gaps, [150, 300, 600]),
        do: assert(gap >= min, "gaps #{inspect(gaps)}")
  end

  test "the carried job's train gets the worker's announced deadline: no restart loop" do
    # Every restart sends the job's train, and a worker may first wait out an orphaned
    # trainer's grace period: killed at :start_timeout (2 s here, 30 s by default), it
    # would be restarted into the same wait, again and again. The fake waits 2.5 s and
    # announces 10 s.
    {:ok, _sup} =
      start_supervised(
        {JobSupervisor,
         job: %{"config_path" => "tiny"},
         worker: fake("slow_train", [2.5, 10]) ++ [subscribers: [self()], start_timeout: 2_000],
         max_restarts: 3,
         max_seconds: 60}
      )

    assert %{"attempt" => 1} = await_event(%{"event" => "hello"}, 10_000)

    assert %{"attempt" => 1, "result" => %{"job_id" => "fake"}} =
             await_event(%{"event" => "job_started"}, 10_000)

    refute_received {:uff_port, _, %{"event" => "worker_down"}}
    refute_received {:uff_port, _, %{"event" => "hello"}}
  end

  test "a job that fails for good (resumable: false) is not restarted: no restart loop", %{
    tmp: tmp
  } do
    # A cloud job whose provider SDK is missing: the worker answers not_available,
    # resumable false. The supervisor keeps running; its worker stays down.
    {:ok, sup} =
      start_supervised(
        {JobSupervisor,
         job: %{
           "config_path" => Path.expand("../../configs/tiny.yaml", __DIR__),
           "run_dir" => "nosdk",
           "overrides" => %{"strategy" => "kaggle"}
         },
         worker:
           worker_opts(tmp, subscribers: [self()], env: without_python_module(tmp, "kaggle")),
         max_restarts: 3,
         max_seconds: 60,
         backoff: [base: 100, max: 1_000, healthy_after: 30_000]}
      )

    assert %{"attempt" => 1} = await_event(%{"event" => "hello"}, 15_000)
    failed = await_event(%{"event" => "failed"}, 30_000)
    assert %{"code" => "not_available", "resumable" => false} = failed
    down = await_event(%{"event" => "worker_down"}, 30_000)
    assert {:shutdown, {:job_failed, %{"code" => "not_available"}}} = down["reason"]
    assert gone?(down["os_pid"], 10_000)

    # A restart would say hello again within the backoff; none comes.
    refute_receive {:uff_port, _, %{"event" => "hello"}}, 2_000
    assert Process.alive?(sup)
    assert JobSupervisor.worker(sup) == nil
  end

  test "the worker dies with the VM: kill -9 of the BEAM leaves no worker behind", %{tmp: tmp} do
    ebin = Path.expand("_build/test/lib/uff_port/ebin", File.cwd!())
    script = Path.join(tmp, "vm.exs")

    File.write!(script, """
    {:ok, w} = UffPort.Worker.start_link(heartbeat_interval: 0.5, runs_root: #{inspect(Path.join(tmp, "runs"))}, stderr_log: #{inspect(Path.join(tmp, "vm.log"))})
    IO.puts("PIDS \#{System.pid()} \#{UffPort.Worker.os_pid(w)}")
    Process.sleep(:infinity)
    """)

    port =
      Port.open({:spawn_executable, System.find_executable("elixir")}, [
        :binary,
        :exit_status,
        {:line, 1_000},
        {:args, ["-pa", ebin, script]},
        {:env, [{~c"UFF_PORT_PYTHON", String.to_charlist(python())}]}
      ])

    {vm_pid, worker_pid} = read_pids(port)
    assert OsProcess.alive?(worker_pid)
    :ok = OsProcess.signal(vm_pid, :kill)
    assert_receive {^port, {:exit_status, _}}, 10_000
    assert gone?(worker_pid, 10_000), "worker #{worker_pid} outlived the VM"
  end

  defp read_pids(port) do
    receive do
      {^port, {:data, {:eol, "PIDS " <> rest}}} ->
        [vm, worker] = rest |> String.split() |> Enum.map(&String.to_integer/1)
        {vm, worker}

      {^port, {:data, _other}} ->
        read_pids(port)
    after
      30_000 -> flunk("the child VM did not report its pids")
    end
  end
end
