defmodule UffPort.CoordinatorTest do
  use ExUnit.Case, async: false

  import UffPort.Test.Helpers
  alias UffPort.{Error, TrainingCoordinator}

  # Cycles spawn real workers and allow themselves up to 120 s on a busy machine.
  @moduletag timeout: 180_000
  @tiny Path.expand("../../configs/tiny.yaml", __DIR__)

  setup do
    tmp = tmp_dir!("coord")
    on_exit(fn -> File.rm_rf(tmp) end)
    {:ok, tmp: tmp}
  end

  test "a refused train ends the cycle with the worker's coded error, without restarts", %{
    tmp: tmp
  } do
    assert {:error, {{:train_refused, %Error{code: :invalid_config, message: msg}}, summary}} =
             TrainingCoordinator.run_training_cycle(nil, :local,
               config: @tiny,
               run_dir: "bad",
               overrides: %{"training.max_steps" => -1},
               worker: worker_opts(tmp)
             )

    assert msg =~ "training.max_steps"
    assert [%{attempt: 1}] = summary.attempts
  end

  test "strategies are checked before anything starts" do
    assert_raise ArgumentError, ~r/strategy must be one of/, fn ->
      TrainingCoordinator.run_training_cycle(nil, :colab)
    end
  end

  @tag :slow
  test "a job that fails for good (missing data) is refused at train, before a trainer starts, once",
       %{tmp: tmp} do
    assert {:error, {{:train_refused, %UffPort.Error{code: :data_not_found}}, summary}} =
             TrainingCoordinator.run_training_cycle(Path.join(tmp, "missing.jsonl"), :local,
               config: @tiny,
               run_dir: "nodata",
               worker: worker_opts(tmp),
               timeout: 120_000
             )

    # A refusal is final: the supervisor does not start the job again.
    assert [%{attempt: 1}] = summary.attempts
    refute File.exists?(Path.join([tmp, "runs", "nodata"]))
  end

  test "a cloud strategy reaches the worker inside the job's config; a missing SDK ends the cycle without restarts",
       %{tmp: tmp} do
    me = self()

    assert {:error, {{:job_failed, info}, summary}} =
             TrainingCoordinator.run_training_cycle(nil, :kaggle,
               config: @tiny,
               run_dir: "cloud",
               worker: worker_opts(tmp, env: without_python_module(tmp, "kaggle")),
               max_restarts: 3,
               timeout: 60_000,
               on_event: fn _a, ev ->
                 if ev["strategy"], do: send(me, {:strategy, ev["strategy"]})
               end
             )

    assert File.read!(Path.join([tmp, "runs", "cloud", "config.yaml"])) =~ ~r/^strategy: kaggle$/m
    assert_received {:strategy, "kaggle"}
    assert %{"code" => "not_available", "resumable" => false, "message" => msg} = info
    assert msg =~ "pip install 'uff-port[cloud-sdks]'"
    # Final: one attempt, stopped as a shutdown, never restarted.
    assert [%{attempt: 1, down: {:shutdown, {:job_failed, _}}}] = summary.attempts
  end
end
