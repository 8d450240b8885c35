defmodule UffPort.WorkerTest do
  # Real `uff-port serve` processes; not async: the machine is small and timing matters.
  use ExUnit.Case, async: false

  import UffPort.Test.Helpers
  alias UffPort.{Error, OsProcess, Worker}

  setup do
    tmp = tmp_dir!("worker")
    on_exit(fn -> File.rm_rf(tmp) end)
    {:ok, tmp: tmp}
  end

  defp start!(tmp, extra \\ []) do
    opts = worker_opts(tmp, Keyword.merge([subscribers: [self()]], extra))
    start_supervised!({Worker, opts}, restart: :temporary)
  end

  test "hello, ping and status against the real worker", %{tmp: tmp} do
    w = start!(tmp)
    snap = Worker.snapshot(w)
    assert snap.hello["protocol"] == 1
    assert snap.os_pid == snap.hello["pid"]
    assert OsProcess.alive?(snap.os_pid)

    assert {:ok, %{"pong" => true, "echo" => %{"x" => [1, 2.5, nil]}}} =
             Worker.request(w, "ping", %{"echo" => %{"x" => [1, 2.5, nil]}})

    assert {:ok, %{"state" => "idle"}} = Worker.status(w)
    assert await_event(%{"event" => "heartbeat"}, 3_000)["state"] == "idle"
  end

  test "requests and replies stay paired under concurrent callers", %{tmp: tmp} do
    w = start!(tmp)

    results =
      1..200
      |> Task.async_stream(
        fn i ->
          cmd = if rem(i, 5) == 0, do: "status", else: "ping"
          {i, cmd, Worker.request(w, cmd, if(cmd == "ping", do: %{"echo" => i}, else: %{}))}
        end,
        max_concurrency: 50,
        timeout: 30_000
      )
      |> Enum.map(fn {:ok, r} -> r end)

    for {i, cmd, result} <- results do
      case cmd do
        "ping" -> assert {:ok, %{"echo" => ^i}} = result
        "status" -> assert {:ok, %{"state" => "idle"}} = result
      end
    end
  end

  test "worker errors come back as coded values", %{tmp: tmp} do
    w = start!(tmp)
    assert {:error, %Error{code: :no_job}} = Worker.checkpoint(w)
    assert {:error, %Error{code: :unknown_command}} = Worker.request(w, "no_such_command")
    assert {:error, %Error{code: :invalid_args}} = Worker.train(w, %{"config_path" => 12})
    assert {:error, %Error{code: :unencodable}} = Worker.request(w, "ping", %{"echo" => self()})
    # Still perfectly usable afterwards.
    assert {:ok, %{"pong" => true}} = Worker.ping(w)
  end

  test "terminate/2 shuts the worker down cleanly (exit 0)", %{tmp: tmp} do
    w = start!(tmp)
    os_pid = Worker.os_pid(w)
    :ok = stop_supervised(Worker)
    down = await_event(%{"event" => "worker_down"})
    assert down["exit_status"] == 0
    assert gone?(os_pid, 2_000)
  end

  test "shutdown/1 replies, the worker exits 0 and the GenServer stops normally", %{tmp: tmp} do
    # With no :stderr_log, the default one in the temp dir is this start's own...
    w = start!(tmp, stderr_log: nil)
    log = Worker.snapshot(w).stderr_log
    assert String.starts_with?(log, System.tmp_dir!()) and File.exists?(log)
    ref = Process.monitor(w)
    assert {:ok, %{"reason" => "shutdown"}} = Worker.shutdown(w)
    assert_receive {:DOWN, ^ref, :process, ^w, :normal}, 10_000
    # ...and a normal stop removes it: the temp dir does not fill up with them.
    refute File.exists?(log)
  end

  test "EOF alone ends the worker when the GenServer is killed without terminate", %{tmp: tmp} do
    w = start!(tmp)
    os_pid = Worker.os_pid(w)
    # :kill skips terminate/2: only the closed pipe (EOF on the worker's stdin) is left.
    Process.exit(w, :kill)
    assert gone?(os_pid, 10_000)
  end

  test "a timed-out call escalates shutdown -> SIGTERM -> SIGKILL and crashes only the worker", %{
    tmp: tmp
  } do
    w = start!(tmp, heartbeat_timeout: 60_000, shutdown_grace: 300, term_grace: 300)
    os_pid = Worker.os_pid(w)
    ref = Process.monitor(w)
    # A frozen process answers nothing and ignores SIGTERM until continued.
    :ok = OsProcess.signal(os_pid, :stop)
    assert {:error, %Error{code: :response_timeout}} = Worker.ping(w, timeout: 300)
    assert_receive {:DOWN, ^ref, :process, ^w, {:call_timeout, "ping"}}, 5_000
    assert gone?(os_pid, 2_000)
    assert {:error, %Error{code: :worker_down}} = Worker.ping(w)
  end

  test "a bad frame from the worker crashes that worker, never the caller" do
    w =
      start_supervised!({Worker, fake("garbage") ++ [subscribers: [self()]]}, restart: :temporary)

    os_pid = Worker.os_pid(w)
    ref = Process.monitor(w)
    assert {:error, %Error{code: :worker_down}} = Worker.ping(w)
    assert_receive {:DOWN, ^ref, :process, ^w, {:bad_frame, {:reserved_byte, 0xC1}}}, 5_000
    assert Process.alive?(self())
    assert gone?(os_pid, 5_000)
  end

  test "a worker gone before reading its job is a crash with its stderr, not a bare EPIPE" do
    # A named worker's default log is named after it (the worker dies too soon to ask).
    name = UffPort.WorkerTest.DiesAfterHello
    log = Path.join(System.tmp_dir!(), "uff_port-#{inspect(name)}.stderr.log")
    File.rm(log)
    on_exit(fn -> File.rm(log) end)

    w =
      start_supervised!(
        {Worker, fake("die_after_hello") ++ [name: name, job: %{"config_path" => "tiny"}]},
        restart: :temporary
      )

    ref = Process.monitor(w)
    assert_receive {:DOWN, ^ref, :process, ^w, reason}, 5_000

    assert {:worker_crashed, %{status: nil, port_closed: :epipe, os_pid: os_pid, stderr: lines}} =
             reason

    assert Enum.any?(lines, &(&1 =~ "died before reading its job"))
    assert gone?(os_pid, 1_000)
    # A crashed worker's default log stays for the post-mortem.
    assert File.read!(log) =~ "died before reading its job"
  end

  test "train gets the deadline the worker announces, not the bridge's shorter default" do
    # The worker may first wait a whole grace period (100 s) for an orphaned trainer's
    # final checkpoint, against the bridge's 30 s default: here 1.5 s against 0.5 s,
    # announced as 10 s. Killed at the default, the worker would restart into the same wait.
    w =
      start_supervised!({Worker, fake("slow_train", [1.5, 10]) ++ [call_timeout: 500]},
        restart: :temporary
      )

    ref = Process.monitor(w)
    assert {:ok, %{"job_id" => "fake"}} = Worker.train(w, %{"config_path" => "tiny"})
    refute_received {:DOWN, ^ref, _, _, _}
    assert {:ok, %{"pong" => true}} = Worker.ping(w)
  end

  test "a subscriber that dies is dropped", %{tmp: tmp} do
    w = start!(tmp)
    sub = spawn(fn -> receive(do: (:stop -> :ok)) end)
    :ok = Worker.subscribe(w, sub)
    :ok = Worker.subscribe(w, sub)
    assert Enum.sort(subscribers(w)) == Enum.sort([self(), sub])
    send(sub, :stop)
    assert wait_until(fn -> subscribers(w) == [self()] end)
  end

  defp subscribers(w), do: :sys.get_state(w) |> UffPort.WorkerState.subscribers()

  defp wait_until(fun, tries \\ 50) do
    cond do
      fun.() ->
        true

      tries == 0 ->
        false

      true ->
        Process.sleep(20)
        wait_until(fun, tries - 1)
    end
  end

  test "start failures are errors with the stderr tail; a silent worker times out", %{tmp: tmp} do
    Process.flag(:trap_exit, true)

    assert {:error,
            {:start_failed, %Error{code: :start_failed, details: %{status: 2, stderr: lines}}}} =
             Worker.start_link(
               worker_args: ["--no-such-flag"],
               stderr_log: Path.join(tmp, "e.log")
             )

    assert Enum.any?(lines, &(&1 =~ "no-such-flag"))

    assert {:error, {:start_failed, %Error{code: :start_timeout}}} =
             Worker.start_link(fake("silent") ++ [start_timeout: 500])
  end

  test "bad options raise ArgumentError naming the option" do
    assert_raise ArgumentError, ~r/heartbeat_timeout/, fn ->
      Worker.start_link(heartbeat_timeout: -1)
    end

    assert_raise ArgumentError, ~r/unknown UffPort.Worker options \[:bogus\]/, fn ->
      Worker.start_link(bogus: 1)
    end

    assert_raise ArgumentError, ~r/not found/, fn ->
      Worker.start_link(python: "/nonexistent/python")
    end
  end
end
