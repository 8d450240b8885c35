defmodule UffPort.WorkerStateTest do
  # Watchdog arithmetic on a bare state: no process, no clock.
  use ExUnit.Case, async: true

  alias UffPort.WorkerState

  defp state do
    [command: {"/bin/true", []}, stall_timeout: 1_000, heartbeat_timeout: 60_000]
    |> WorkerState.config!()
    |> Map.merge(%{last_heartbeat_at: 0, step_changed_at: 0})
  end

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
end
