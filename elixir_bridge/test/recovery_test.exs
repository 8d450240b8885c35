defmodule UffPort.RecoveryTest do
  # A damaged newest checkpoint: the worker quarantines it, the bridge delivers
  # `checkpoint_quarantined` to subscribers like any other event, and the same
  # `train` resumes from the previous checkpoint and finishes.
  use ExUnit.Case, async: false

  import UffPort.Test.Helpers
  alias UffPort.Worker

  @moduletag :slow
  @moduletag timeout: 300_000
  @tiny Path.expand("../../configs/tiny.yaml", __DIR__)
  @overrides %{
    "checkpoint.every_steps" => 2,
    "checkpoint.keep_last" => 3,
    "eval.every_steps" => nil,
    "data.seq_len" => 64
  }

  setup do
    tmp = tmp_dir!("recovery")
    on_exit(fn -> File.rm_rf(tmp) end)
    {:ok, tmp: tmp}
  end

  defp train(w, steps) do
    Worker.train(w, %{
      "config_path" => @tiny,
      "run_dir" => "job",
      "overrides" => Map.put(@overrides, "training.max_steps", steps)
    })
  end

  test "checkpoint_quarantined reaches subscribers and the same train resumes", %{tmp: tmp} do
    w = start_supervised!({Worker, worker_opts(tmp, subscribers: [self()])}, restart: :temporary)
    assert {:ok, _} = train(w, 4)
    assert await_event(%{"event" => "finished"}, 180_000)["step"] == 4
    await_event(%{"event" => "state", "state" => "idle"}, 30_000)

    optimizer = Path.join([tmp, "runs", "job", "checkpoints", "step-00000004", "optimizer.pt"])
    <<head::binary-size(100), byte, rest::binary>> = File.read!(optimizer)
    File.write!(optimizer, <<head::binary, Bitwise.bxor(byte, 1), rest::binary>>)

    assert {:ok, %{"resumed_from" => 2}} = train(w, 6)
    event = await_event(%{"event" => "checkpoint_quarantined"}, 30_000)
    assert event["name"] == "step-00000004" and event["reason"] =~ "sha256 mismatch"
    assert is_integer(event["seq"]) and event["job_id"] == "job"
    assert await_event(%{"event" => "finished"}, 180_000)["step"] == 6
  end
end
