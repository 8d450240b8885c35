defmodule UffPort.WorkerStateTest do
  # The bridge's rules on a bare state: no process, no clock, no file.
  use ExUnit.Case, async: true

  alias UffPort.{WorkerOptions, WorkerState}

  @hello %{"event" => "hello", "protocol" => 1, "pid" => 4242}

  defp opts(extra \\ []),
    do: WorkerOptions.new!([command: {"/bin/true", []}, stderr_log: "/tmp/unused.log"] ++ extra)

  defp state(extra \\ [stall_timeout: 1_000, heartbeat_timeout: 60_000]),
    do: extra |> opts() |> WorkerState.new() |> WorkerState.started(@hello, 0)

  defp event(state, name, fields, now),
    do: WorkerState.on_event(state, name, Map.put(fields, "event", name), now)

  # A heartbeat while the worker is in its training state.
  defp beat(state, now), do: event(state, "heartbeat", %{"state" => "training"}, now)

  test "only the stepping phase can stall: starting (no phase yet) and loading cannot" do
    s =
      state()
      |> event("state", %{"state" => "starting", "job_id" => "j"}, 0)
      |> event("state", %{"state" => "training", "job_id" => "j"}, 10)
      |> WorkerState.job_accepted(20)

    # The trainer imports for a while before it says anything: not a stall.
    s = beat(s, 5_000)
    assert WorkerState.watchdog(s, 5_000) == :ok

    s = event(s, "state", %{"state" => "training", "phase" => "loading"}, 5_000) |> beat(9_000)
    assert WorkerState.watchdog(s, 9_000) == :ok

    # Stepping from 9_000: the clock starts there.
    s = event(s, "state", %{"state" => "training", "phase" => "training", "step" => 0}, 9_000)
    s = s |> event("progress", %{"step" => 1}, 9_500) |> beat(10_400)
    assert WorkerState.watchdog(s, 10_400) == :ok

    s = beat(s, 10_600)

    assert {:kill, {:stalled, %{step: 1, stalled_ms: 1_100, timeout_ms: 1_000}}} =
             WorkerState.watchdog(s, 10_600)

    # Evaluating is slow but not a stall; back to stepping restarts the clock.
    s = event(s, "state", %{"state" => "training", "phase" => "evaluating"}, 10_600)
    assert WorkerState.watchdog(beat(s, 20_000), 20_000) == :ok
    s = event(s, "state", %{"state" => "training", "phase" => "training"}, 20_000)
    assert WorkerState.watchdog(beat(s, 20_900), 20_900) == :ok
    assert {:kill, {:stalled, _}} = WorkerState.watchdog(beat(s, 21_100), 21_100)
  end

  test "a finished job stops the stall clock" do
    s =
      state()
      |> event("state", %{"state" => "training", "phase" => "training"}, 0)
      |> event("finished", %{"step" => 5}, 100)

    assert WorkerState.watchdog(s, 5_000) == :ok
    s = event(s, "heartbeat", %{"state" => "idle"}, 5_000)
    assert WorkerState.watchdog(s, 9_000) == :ok
  end

  test "a resumed start is healthy only after its first own step, not on the resume step" do
    s =
      state()
      |> event("state", %{"state" => "training", "phase" => "training", "step" => 125}, 0)

    refute s.healthy?
    s = event(s, "progress", %{"step" => 126}, 100)
    assert s.healthy?
  end

  test "the heartbeat watchdog fires once the worker is silent past its timeout" do
    s = state(heartbeat_timeout: 1_000) |> beat(500)
    assert WorkerState.watchdog(s, 1_500) == :ok

    assert {:kill, {:heartbeat_timeout, %{silent_ms: 1_001, timeout_ms: 1_000, os_pid: 4242}}} =
             WorkerState.watchdog(s, 1_501)
  end

  test "exit statuses map to stop reasons in one place" do
    s = state()
    assert WorkerState.exit_reason(s, 0, ["x"]) == :normal
    assert WorkerState.exit_reason(s, 75, ["x"]) == {:shutdown, :resumable}

    assert WorkerState.exit_reason(s, 3, ["boom"]) ==
             {:worker_crashed, %{status: 3, signal: nil, os_pid: 4242, stderr: ["boom"]}}

    assert {:worker_crashed, %{status: 137, signal: 9}} = WorkerState.exit_reason(s, 137, [])

    assert {:worker_crashed, %{status: nil, port_closed: :epipe, stderr: ["e"]}} =
             WorkerState.port_closed_reason(s, :epipe, ["e"])

    assert WorkerState.clean_stop?(:normal) and WorkerState.clean_stop?({:shutdown, :resumable})
    refute WorkerState.clean_stop?({:worker_crashed, %{}})
  end

  test "teardown starts where the worker can still be reached" do
    assert WorkerState.teardown_steps({:heartbeat_timeout, %{}}) == [:sigkill]
    assert WorkerState.teardown_steps({:stalled, %{}}) == [:sigkill]
    assert WorkerState.teardown_steps({:bad_frame, :x}) == [:sigterm, :sigkill]
    assert WorkerState.teardown_steps(:shutdown) == [:shutdown, :sigterm, :sigkill]
    assert WorkerState.teardown_steps({:call_timeout, "ping"}) == [:shutdown, :sigterm, :sigkill]
  end

  test "requests get increasing ids and are popped once" do
    s = state()
    {1, s} = WorkerState.reserve_id(s)
    s = WorkerState.put_pending(s, 1, %{from: :job, cmd: "train", timer: make_ref(), timeout: 5})
    {2, s} = WorkerState.reserve_id(s)
    s = WorkerState.put_pending(s, 2, %{from: :job, cmd: "ping", timer: make_ref(), timeout: 5})

    assert {%{cmd: "ping"}, s} = WorkerState.pop_pending(s, 2)
    assert {nil, s} = WorkerState.pop_pending(s, 2)
    assert {nil, s} = WorkerState.pop_pending(s, nil)
    assert {[%{cmd: "train"}], s} = WorkerState.take_pending(s)
    assert s.pending == %{} and s.next_id == 3
  end

  test "deadlines: the bridge's defaults, or the worker's announced deadline when longer" do
    s = state(call_timeout: 1_000, long_call_timeout: 5_000, start_timeout: 2_000)
    # No command_info (an older worker, a fake one): the bridge's defaults.
    assert WorkerState.deadline(s, "train") == 1_000
    assert WorkerState.deadline(s, "stop") == 5_000
    assert WorkerState.job_deadline(s) == 2_000

    info = %{
      "train" => %{"long_running" => true, "deadline_s" => 130.0},
      "stop" => %{"long_running" => true, "deadline_s" => 1},
      "ping" => %{"long_running" => false, "deadline_s" => nil},
      "plan" => %{"long_running" => true, "deadline_s" => "soon"},
      "huge" => %{"deadline_s" => 1.0e12}
    }

    s = WorkerState.started(s, Map.put(@hello, "command_info", info), 0)
    assert WorkerState.deadline(s, "train") == 130_000
    assert WorkerState.job_deadline(s) == 130_000
    # Shorter than the bridge's own default: the default stands.
    assert WorkerState.deadline(s, "stop") == 5_000
    assert WorkerState.deadline(s, "ping") == 1_000
    assert WorkerState.deadline(s, "plan") == 1_000
    # Held to the longest timer the VM can set.
    assert WorkerState.deadline(s, "huge") == 4_294_967_295

    s = WorkerState.started(s, Map.put(@hello, "command_info", "garbage"), 0)
    assert WorkerState.deadline(s, "train") == 1_000
  end

  test "subscribers are kept by monitor and dropped when theirs fires" do
    {a, b} = {make_ref(), make_ref()}
    pid = spawn(fn -> :ok end)

    s =
      state()
      |> WorkerState.add_subscriber(self(), a)
      |> WorkerState.add_subscriber(pid, b)
      |> WorkerState.add_subscriber(:some_name, nil)

    assert WorkerState.subscribed?(s, pid)
    s = WorkerState.drop_subscriber(s, b)
    assert Enum.sort(WorkerState.subscribers(s)) == Enum.sort([self(), :some_name])
    # A stray reference drops nothing; names are never dropped.
    assert WorkerState.drop_subscriber(s, make_ref()) == s
  end

  test "options: defaults filled, bad ones raise ArgumentError naming the option" do
    o = opts()
    assert o.call_timeout == 30_000 and o.heartbeat_interval == 2.0 and o.temp_log? == false
    assert o.watchdog_every == 2_000

    for {key, bad} <- [
          call_timeout: 0,
          stall_timeout: 1.5,
          heartbeat_interval: 0,
          grace_seconds: -1,
          max_frame_bytes: "big",
          name: "w",
          runs_root: 5,
          env: [:x],
          subscribers: [1],
          job: [config_path: "tiny"],
          backoff: [base: -1],
          command: "python"
        ] do
      assert_raise ArgumentError, ~r/#{key}/, fn -> opts([{key, bad}]) end
    end

    assert_raise ArgumentError, ~r/unknown UffPort.Worker options \[:bogus\]/, fn ->
      opts(bogus: 1)
    end
  end
end
