defmodule UffPort.TrainingTest do
  # Trains the tiny CPU model for real, through the real worker.
  use ExUnit.Case, async: false

  import UffPort.Test.Helpers
  alias UffPort.{OsProcess, TrainingCoordinator, Worker}

  @moduletag :slow
  @moduletag timeout: 300_000
  @tiny Path.expand("../../configs/tiny.yaml", __DIR__)
  # Short, with a durable checkpoint every 4 steps and a progress event per step.
  @overrides %{
    "training.max_steps" => 12,
    "checkpoint.every_steps" => 3,
    "eval.every_steps" => 1000,
    "training.progress_every_seconds" => 0
  }

  setup do
    tmp = tmp_dir!("train")
    on_exit(fn -> File.rm_rf(tmp) end)
    {:ok, tmp: tmp}
  end

  defp cycle(tmp, run_dir, extra) do
    me = self()

    opts =
      [
        config: @tiny,
        run_dir: run_dir,
        overrides: @overrides,
        worker: worker_opts(tmp, stderr_log: Path.join(tmp, run_dir <> ".log")),
        timeout: 240_000,
        on_event: fn attempt, ev ->
          if ev["event"] == "checkpoint", do: send(me, {:checkpoint, attempt, ev["step"]})
        end
      ] ++ extra

    assert {:ok, summary} = TrainingCoordinator.run_training_cycle(nil, :local, opts)
    summary
  end

  test "SIGKILL mid-training: restarted by the supervisor, resumed from the last durable checkpoint, same final step and loss",
       %{tmp: tmp} do
    ref = cycle(tmp, "reference", [])
    assert ref.final_step == 12
    assert [%{attempt: 1, down: nil, resumed_from: nil}] = ref.attempts
    flush_checkpoints()

    run = cycle(tmp, "crashed", inject_crash_at: 7)
    assert run.injected_at == 7
    assert [first, second] = run.attempts
    assert {:worker_crashed, %{signal: 9}} = first.down
    assert second.os_pid != first.os_pid
    assert OsProcess.wait_gone(first.os_pid, 1_000) == :ok

    # Resumed from the last checkpoint that was durable before the kill (or a later one
    # the dying trainer saved on its parent-death SIGTERM), never from scratch.
    durable = for {:checkpoint, 1, step} <- flush_checkpoints(), step <= 7, do: step

    assert is_integer(second.resumed_from) and
             second.resumed_from >= Enum.max(durable, fn -> 3 end)

    assert second.first_step == second.resumed_from + 1

    # The loss after resume continues the uncrashed run's curve step for step.
    ref_loss = Map.new(for {1, step, loss} <- ref.losses, do: {step, loss})
    resumed = for {2, step, loss} <- run.losses, do: {step, loss}
    assert length(resumed) >= 12 - second.resumed_from - 2

    for {step, loss} <- resumed, Map.has_key?(ref_loss, step) do
      assert_in_delta loss, ref_loss[step], 1.0e-6 * abs(loss), "step #{step}"
    end

    assert run.final_step == ref.final_step
    assert_in_delta run.final_loss, ref.final_loss, 1.0e-6 * abs(ref.final_loss)
    assert is_integer(run.recovery_ms)
  end

  test "a hung trainer (SIGSTOP) is caught by the stall watchdog and the whole tree is killed", %{
    tmp: tmp
  } do
    opts =
      worker_opts(tmp, subscribers: [self()], stall_timeout: 3_000, heartbeat_timeout: 60_000)

    w = start_supervised!({Worker, opts}, restart: :temporary)
    os_pid = Worker.os_pid(w)

    {:ok, _} =
      Worker.train(w, %{
        "config_path" => @tiny,
        "run_dir" => "stall",
        "overrides" => Map.put(@overrides, "training.max_steps", 500)
      })

    await_event(%{"event" => "progress"}, 120_000)
    trainers = OsProcess.descendants(os_pid)
    assert trainers != []
    stopped_at = System.monotonic_time(:millisecond)
    for pid <- trainers, do: OsProcess.signal(pid, :stop)

    down = await_event(%{"event" => "worker_down"}, 15_000)
    assert {:stalled, %{timeout_ms: 3_000}} = down["reason"]
    assert System.monotonic_time(:millisecond) - stopped_at < 3_000 + 600 + 4_000
    assert gone?(os_pid, 5_000)
    for pid <- trainers, do: assert(gone?(pid, 5_000), "trainer #{pid} left behind")
  end

  test "checkpoint/1, stop/2, resume/2 and status/1 drive a real job", %{tmp: tmp} do
    w = start_supervised!({Worker, worker_opts(tmp, subscribers: [self()])}, restart: :temporary)

    overrides =
      Map.merge(@overrides, %{"training.max_steps" => 500, "checkpoint.every_steps" => 1000})

    {:ok, %{"run_dir" => run_dir, "resumed_from" => nil}} =
      Worker.train(w, %{"config_path" => @tiny, "run_dir" => "api", "overrides" => overrides})

    assert {:error, %UffPort.Error{code: :busy}} = Worker.train(w, %{"config_path" => @tiny})
    await_event(%{"event" => "progress"}, 120_000)
    assert {:ok, %{"step" => step, "path" => path}} = Worker.checkpoint(w)
    assert step >= 1 and File.exists?(Path.join(path, "manifest.json"))
    assert {:ok, %{"state" => "training", "step" => s}} = Worker.status(w)
    assert s >= step

    assert {:ok, %{"step" => stopped_at}} = Worker.stop(w, %{"checkpoint" => true})
    assert stopped_at >= step
    assert {:ok, %{"resumed_from" => ^stopped_at}} = Worker.resume(w, %{"run_dir" => run_dir})
    await_progress_after(stopped_at, run_dir, tmp)
    assert {:ok, _} = Worker.stop(w, %{"checkpoint" => false})
  end

  test "an RL job (stage rl, configs/rl-tiny.yaml) is stopped and resumed through the bridge",
       %{tmp: tmp} do
    w = start_supervised!({Worker, worker_opts(tmp, subscribers: [self()])}, restart: :temporary)
    rl = Path.expand("../../configs/rl-tiny.yaml", __DIR__)

    overrides = %{
      "training.max_steps" => 500,
      "checkpoint.every_steps" => 1000,
      "training.progress_every_seconds" => 0
    }

    {:ok, %{"run_dir" => run_dir, "resumed_from" => nil}} =
      Worker.train(w, %{"config_path" => rl, "run_dir" => "rl", "overrides" => overrides})

    await_event(%{"event" => "rollout"}, 120_000)
    assert {:ok, %{"step" => s}} = Worker.status(w)
    assert {:ok, %{"step" => stopped_at}} = Worker.stop(w, %{"checkpoint" => true})
    assert stopped_at >= s
    assert {:ok, %{"resumed_from" => ^stopped_at}} = Worker.resume(w, %{"run_dir" => run_dir})
    await_progress_after(stopped_at, run_dir, tmp)
    assert {:ok, _} = Worker.stop(w, %{"checkpoint" => false})
  end

  # The resumed job's first step past `step`; a job that ends or a worker that goes
  # down instead fails the test at once, with what the trainer and worker wrote.
  defp await_progress_after(step, run_dir, tmp) do
    receive do
      {:uff_port, _, %{"event" => "progress", "step" => s}} when s > step ->
        s

      {:uff_port, _, %{"event" => name} = ev}
      when name in ["failed", "finished", "worker_down"] ->
        flunk(
          "#{name} instead of progress after step #{step}: #{inspect(ev)}\n" <> logs(run_dir, tmp)
        )

      {:uff_port, _, _} ->
        await_progress_after(step, run_dir, tmp)
    after
      120_000 -> flunk("no progress after step #{step} in 120 s\n" <> logs(run_dir, tmp))
    end
  end

  defp logs(run_dir, tmp) do
    for path <- [Path.join(run_dir, "trainer.log"), Path.join(tmp, "worker.stderr.log")],
        into: "" do
      tail =
        case File.read(path) do
          {:ok, text} -> text |> String.split("\n") |> Enum.take(-30) |> Enum.join("\n")
          {:error, reason} -> inspect(reason)
        end

      "--- #{path} (last lines) ---\n#{tail}\n"
    end
  end

  defp flush_checkpoints(acc \\ []) do
    receive do
      {:checkpoint, _, _} = msg -> flush_checkpoints([msg | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end
end
