defmodule UffPort.CampaignTest do
  # Real worker, real tiny training, real registry; the long test adds the cloud fakes
  # (UFF_PORT_CLOUD_FAKE) and kills: the campaign process three times, the whole VM once.
  use ExUnit.Case, async: false

  import UffPort.Test.Helpers

  alias UffPort.{Campaign, CampaignJournal, CampaignSupervisor, Msgpack, TrainingCoordinator}

  @repo Path.expand("../..", __DIR__)
  @managers ~w(ufm ucm urm ulm uim uam)
  @tiny_overrides """
  overrides:
    training.max_steps: 4
    checkpoint.every_steps: 2
    eval.every_steps: null
    output.plot: false
  """

  # ------------------------------------------------------------------ journal

  test "journal: records round-trip; a torn tail is cut on open; damage before it is refused" do
    dir = tmp_dir!("journal")
    {:ok, j, []} = CampaignJournal.open(dir)
    {:ok, j, _} = CampaignJournal.append(j, %{"kind" => "a", "x" => 1})
    {:ok, j, _} = CampaignJournal.append(j, %{"kind" => "b", "y" => [1.5, "z"]})
    CampaignJournal.close(j)
    path = CampaignJournal.path(dir)
    whole = File.read!(path)

    for cut <- 1..10 do
      File.write!(path, binary_part(whole, 0, byte_size(whole) - cut))
      {:ok, j, recs} = CampaignJournal.open(dir)
      assert [%{"kind" => "a", "seq" => 1}] = recs
      # the torn bytes are gone: the next record follows the last whole one
      {:ok, j, _} = CampaignJournal.append(j, %{"kind" => "c"})
      CampaignJournal.close(j)

      assert {:ok, [%{"kind" => "a"}, %{"kind" => "c", "seq" => 2}], 0} =
               CampaignJournal.read(dir)
    end

    garbage_tail = whole <> <<3::32, 0xC1, 0xC1, 0xC1>>
    File.write!(path, garbage_tail)
    assert {:ok, _, [_, _]} = CampaignJournal.open(dir)
    assert File.read!(path) == whole

    File.write!(path, <<3::32, 0xC1, 0xC1, 0xC1>> <> whole)
    assert {:error, {:journal_damaged, 0, {:reserved_byte, 0xC1}}} = CampaignJournal.open(dir)

    # the Python reader agrees (uff_port.campaign.journal)
    File.write!(path, whole <> <<0, 0>>)

    {out, 0} =
      System.cmd(
        python(),
        [
          "-c",
          "import sys,json;from uff_port.campaign.journal import load;j=load(sys.argv[1]);" <>
            "print(json.dumps([[r['kind'] for r in j.records], j.torn_tail_bytes]))",
          dir
        ],
        env: [{"PYTHONPATH", @repo}]
      )

    assert String.trim(out) == ~s([["a", "b"], 2])
    <<n::32, body::binary-size(n), _::binary>> = whole
    assert {:ok, %{"kind" => "a", "x" => 1, "seq" => 1}} = Msgpack.decode(body)
  end

  test "an invalid spec stops the campaign with every problem named, and it is not restarted" do
    tmp = tmp_dir!("campaign_bad")
    spec = Path.join(tmp, "bad.yaml")

    File.write!(spec, """
    name: Bad Name
    budgets: {local_gpus: -1}
    models:
      - {name: main, preset: tiny, parent: nobody}
    """)

    assert {:error, {:campaign_stopped, %{"reason" => reason}}} =
             TrainingCoordinator.run_campaign(spec, worker: worker_opts(tmp), timeout: 60_000)

    assert reason =~ "name:"
    assert reason =~ "budgets.local_gpus"
  end

  # ------------------------------------------------------------------ outcomes

  @tag timeout: 300_000
  test "a gate refusal is a verdict with its reasons, a failure skips its dependants, the rest goes on" do
    tmp = tmp_dir!("campaign_outcomes")
    strict = Path.join(tmp, "strict.yaml")

    File.write!(strict, """
    schema_version: 1
    quality: {enabled: true, metric: eval_loss, higher_is_better: false, threshold: 0.001}
    latency: {enabled: false}
    safety: {enabled: false}
    """)

    spec = Path.join(tmp, "spec.yaml")

    File.write!(spec, """
    name: outcomes
    strategy: local
    #{@tiny_overrides}
    promotion: {gates: #{strict}}
    models:
      - {name: main, preset: tiny}
      - {name: ufm, preset: tiny, parent: main}
      - {name: ucm, preset: tiny, data: #{tmp}/no-such-corpus.jsonl}
    """)

    collector = spawn_link(fn -> collect([]) end)
    me = self()
    sampler = spawn_link(fn -> sample_trainers(tmp, me, []) end)

    assert {:ok, done} =
             TrainingCoordinator.run_campaign(spec,
               worker: worker_opts(tmp),
               subscribers: [collector],
               tick_ms: 200,
               timeout: 280_000
             )

    send(sampler, :stop)
    samples = receive do: ({:samples, s} -> s)

    assert done["jobs"] == %{"main" => "refused", "ufm" => "skipped", "ucm" => "failed"}
    d = done["details"]
    assert d["main"]["reason"] =~ "quality"
    assert d["ufm"]["reason"] =~ "parent main refused"
    assert d["ucm"]["reason"] =~ "no-such-corpus"

    send(collector, {:events, self()})
    events = receive do: ({:events, evs} -> evs)

    assert [%{"reasons" => [r | _], "gates" => [_ | _]}] =
             for(%{"event" => "campaign_job_refused", "job" => "main"} = e <- events, do: e)

    assert r =~ "quality"

    assert Enum.any?(
             events,
             &match?(
               %{"event" => "campaign_job_started", "job" => "main", "backend" => "local"},
               &1
             )
           )

    assert Enum.any?(
             events,
             &match?(%{"event" => "campaign_job_finished", "job" => "main", "step" => 4}, &1)
           )

    assert Enum.any?(events, &match?(%{"event" => "campaign_job_skipped", "job" => "ufm"}, &1))
    assert Enum.any?(events, &match?(%{"event" => "campaign_job_failed", "job" => "ucm"}, &1))
    refute Enum.any?(events, &match?(%{"event" => "campaign_job_promoted"}, &1))
    # nothing promoted: no release, said so
    assert done["release"]["state"] == "failed"

    # a finished campaign started again does nothing but say so
    {:ok, records, 0} = CampaignJournal.read(Path.join([tmp, "runs", "campaigns", "outcomes"]))

    # one GPU (the default): one local job at a time, seen from the kernel and in the journal;
    # the trainer keeps the VM's own CUDA_VISIBLE_DEVICES
    assert samples != [] and Enum.all?(samples, &(length(&1) <= 1)), inspect(samples)
    inherited = System.get_env("CUDA_VISIBLE_DEVICES")
    assert Enum.all?(Enum.concat(samples), fn {_, c} -> c == inherited end)
    order = for %{"kind" => "job", "state" => s} = r <- records, do: {r["job"], s}
    [first, second] = for {j, "training"} <- order, j in ~w(main ucm), do: j
    i_first_done = Enum.find_index(order, fn {j, s} -> j == first and s != "training" end)
    assert i_first_done < Enum.find_index(order, &(&1 == {second, "training"})), inspect(order)

    assert {:ok, again} =
             TrainingCoordinator.run_campaign(spec, worker: worker_opts(tmp), timeout: 60_000)

    assert again["jobs"] == done["jobs"]

    {:ok, after_records, 0} =
      CampaignJournal.read(Path.join([tmp, "runs", "campaigns", "outcomes"]))

    assert Enum.count(after_records, &(&1["kind"] == "job" and &1["state"] == "training")) ==
             Enum.count(records, &(&1["kind"] == "job" and &1["state"] == "training"))
  end

  # ------------------------------------------------------------------ sft -> rl

  @tag timeout: 300_000
  test "stages [sft, rl]: the RL job starts from the registered SFT artifact; a kill between the stages resumes, nothing twice" do
    tmp = tmp_dir!("campaign_rl")
    {sup, gates} = start_two_stage(tmp, "name: sftrl\nstrategy: local")
    # the campaign process killed right after it journaled the rl stage (before or as it starts)
    kill_at_training_rl(sup, 240_000)

    # the gates file changed after planning: the campaign promotes with the journaled plan's gates
    File.write!(gates, """
    schema_version: 1
    quality: {enabled: true, metric: eval_loss, higher_is_better: false, threshold: 0.000001}
    latency: {enabled: true, prompts: ["def f(x):"], max_new_tokens: 4, warmup: 0, repeats: 1, max_p95_ms: 0.001}
    """)

    done = drive(sup, [], 0, [], 240_000)
    Supervisor.stop(sup)

    assert done["jobs"] == %{"main" => "promoted"}
    d = done["details"]["main"]
    assert d["step"] == 4 and d["rl_step"] == 2
    sft_art = d["sft_artifact_id"]
    assert is_binary(sft_art) and d["artifact_id"] != sft_art

    # the promoted artifact is the RL run's, started from the SFT artifact and saying so
    art = Path.join([tmp, "runs", "registry", "artifacts", d["artifact_id"], "artifact.json"])

    {parent, 0} =
      System.cmd(python(), [
        "-c",
        "import json,sys;print(json.load(open(sys.argv[1]))['lineage']['parent'])",
        art
      ])

    assert String.trim(parent) == sft_art

    dir = Path.join([tmp, "runs", "campaigns", "sftrl"])
    {:ok, records, 0} = CampaignJournal.read(dir)
    states = for %{"kind" => "job", "state" => s} <- records, do: s

    assert states == ~w(training registering_sft training_rl registering promoting promoted)
    assert Enum.count(records, &(&1["kind"] == "campaign_started")) == 2
    # the SFT stage ran once (one `training` above); the RL run directory is its own
    assert File.exists?(Path.join([tmp, "runs", "campaigns", "sftrl", "main-rl"]))
  end

  @tag :slow
  @tag timeout: 300_000
  test "stages [sft, rl] on the SageMaker fake: both stages train there, the RL one from the SFT adapter it carries; killed between the stages and in the RL session, nothing twice" do
    tmp = tmp_dir!("campaign_rl_cloud")
    fake = cloud_fakes!(tmp)

    {sup, _gates} =
      start_two_stage(tmp, """
      name: sftrlsm
      strategy: sagemaker
      cloud:
        sagemaker: {bucket: uff-test, role_arn: "arn:aws:iam::000000000000:role/uff", image_uri: "img:1", region: us-east-1, max_runtime_seconds: 900}
        poll: {interval_seconds: 0.2}
        safety_margin_seconds: 0
      """)

    # the campaign process killed as it journals the rl stage (before its session is submitted) ...
    kill_at_training_rl(sup, 120_000)

    # ... and again once the provider has the RL session: the restart picks it up from the run's
    # cloud journal instead of submitting another
    rl_journal =
      Path.join([tmp, "runs", "campaigns", "sftrlsm", "main-rl", "cloud", "journal.json"])

    {:ok, killed} = Agent.start_link(fn -> false end)
    spawn_link(fn -> kill_in_session(sup, rl_journal, killed, 120_000) end)

    done = drive(sup, [], 0, [], 180_000)
    Supervisor.stop(sup)
    assert Agent.get(killed, & &1), "the RL session was never seen submitted"

    assert done["jobs"] == %{"main" => "promoted"}, inspect(done["details"])
    d = done["details"]["main"]
    assert d["backend"] == "sagemaker"
    sft_art = d["sft_artifact_id"]
    assert is_binary(sft_art) and d["artifact_id"] != sft_art

    dir = Path.join([tmp, "runs", "campaigns", "sftrlsm"])
    {:ok, records, 0} = CampaignJournal.read(dir)
    [%{"jobs" => [plan]} | _] = for %{"kind" => "plan"} = r <- records, do: r
    assert plan["backend"] == "sagemaker" and plan["rl"]["max_steps"] == 2
    # both stages ran to their last step
    assert d["step"] == plan["max_steps"] and d["rl_step"] == plan["rl"]["max_steps"]

    # each stage trained on SageMaker (its run directory's cloud journal), both artifacts
    # say so, the RL one names the SFT one as its parent; every provider submission is
    # one journaled session, none twice
    {out, 0} =
      System.cmd(python(), [
        "-c",
        """
        import json, pathlib, sys, yaml
        dir, fake, reg = (pathlib.Path(a) for a in sys.argv[1:4])
        runs = {}
        for run in ("main", "main-rl"):
            j = json.loads((dir / run / "cloud" / "journal.json").read_text())
            runs[run] = sorted({s["backend"] for s in j["sessions"]}) + [len(j["sessions"])]
        art = lambda a: json.loads((reg / "artifacts" / a / "artifact.json").read_text())["lineage"]
        creations = (fake / "sagemaker" / "creations.log").read_text().split()
        sft, rl = art(sys.argv[4]), art(sys.argv[5])
        # the SFT adapter travels in the RL session's bundle; the trainer there reads that copy
        init = lambda c: yaml.safe_load(c.read_text())["model"]["init_adapter"]
        weights = (reg / "artifacts" / sys.argv[4] / "adapter_model.safetensors").read_bytes()
        carried = [init(b / "config.yaml") == "data/init-adapter"
                   and (b / "data" / "init-adapter" / "adapter_model.safetensors").read_bytes() == weights
                   for b in fake.glob("s3/*/*/*/sessions/uff-main-rl-*/bundle")]
        used = [init(c) for c in fake.glob("sagemaker/containers/uff-main-rl-*/model/run/config.yaml")]
        print(json.dumps({"runs": runs, "backends": [sft["backend"], rl["backend"]], "rl_parent": rl["parent"],
                          "carried": carried, "used_copy": bool(used) and all(str(reg) not in u for u in used),
                          "sm": len(creations), "sm_unique": len(set(creations))}))
        """,
        dir,
        fake,
        Path.join([tmp, "runs", "registry"]),
        sft_art,
        d["artifact_id"]
      ])

    seen = UffPort.Test.MiniJSON.decode!(out)
    assert %{"main" => ["sagemaker", n_sft], "main-rl" => ["sagemaker", n_rl]} = seen["runs"]
    assert seen["backends"] == ["sagemaker", "sagemaker"]
    assert seen["rl_parent"] == sft_art
    assert seen["carried"] != [] and Enum.all?(seen["carried"]) and seen["used_copy"]
    assert seen["sm"] == seen["sm_unique"] and seen["sm"] == n_sft + n_rl

    states = for %{"kind" => "job", "state" => s} <- records, do: s
    # the SFT stage trained once: one `training`, the restarts went on with `training_rl`
    assert states == ~w(training registering_sft training_rl registering promoting promoted)
    assert Enum.count(records, &(&1["kind"] == "campaign_started")) == 3
  end

  defp kill_in_session(sup, journal, killed, timeout) do
    submitted? =
      case File.read(journal) do
        {:ok, body} -> body =~ ~r/"state": "(submitted|running)"/
        _ -> false
      end

    pid = CampaignSupervisor.campaign(sup)

    cond do
      submitted? and is_pid(pid) ->
        Process.exit(pid, :kill)
        Agent.update(killed, fn _ -> true end)

      timeout <= 0 ->
        :gave_up

      true ->
        Process.sleep(50)
        kill_in_session(sup, journal, killed, timeout - 50)
    end
  end

  # ------------------------------------------------------------------ retries

  @tag timeout: 120_000
  test "the retry count is journaled: a restarted campaign goes on counting" do
    tmp = tmp_dir!("campaign_retries")
    spec = Path.join(tmp, "spec.yaml")

    File.write!(spec, """
    name: retries
    strategy: local
    #{@tiny_overrides}
    schedule: {mode: daily, hour: 2, window_hours: 1}
    models:
      - {name: main, preset: tiny}
    """)

    start = fn clock ->
      {:ok, sup} =
        CampaignSupervisor.start_link(
          spec_path: spec,
          worker: worker_opts(tmp),
          subscribers: [self()],
          clock: fn -> clock end,
          tick_ms: 200
        )

      sup
    end

    # 1. outside the daily window: the plan is journaled, nothing trains
    sup = start.(1_795_920_000 + 12 * 3600)

    assert_receive {:uff_campaign, _, %{"record" => %{"kind" => "plan"}}}, 60_000
    Supervisor.stop(sup)

    # 2. as if two trainer_failed retries had happened before the VM went down
    dir = Path.join([tmp, "runs", "campaigns", "retries"])
    {:ok, j, _} = CampaignJournal.open(dir)

    {:ok, j, _} =
      CampaignJournal.append(j, %{
        "kind" => "job",
        "job" => "main",
        "state" => "waiting",
        "reason" => "job failed: trainer_failed",
        "resume" => "training",
        "retries" => 2,
        "retry_at" => 0
      })

    CampaignJournal.close(j)

    # 3. started again: the third attempt, not the first
    sup = start.(1_795_920_000 + 2 * 3600)
    assert_receive {:uff_campaign, _, %{"event" => "campaign_job_started"} = ev}, 60_000
    Supervisor.stop(sup)
    assert ev["attempt"] == 3 and ev["job"] == "main"
  end

  # ------------------------------------------------------------------ GPUs

  @tag timeout: 300_000
  test "two GPUs: two local jobs at once, each trainer with a CUDA_VISIBLE_DEVICES of its own" do
    tmp = tmp_dir!("campaign_gpus")
    gates = Path.join(tmp, "gates.yaml")
    File.write!(gates, "schema_version: 1\nlatency: {enabled: false}\nsafety: {enabled: false}\n")

    # (one GPU, one local job at a time: the outcomes test above)
    spec = Path.join(tmp, "two.yaml")

    File.write!(spec, """
    name: two
    strategy: local
    budgets: {local_gpus: 2}
    #{@tiny_overrides}
    promotion: {gates: #{gates}, policy: candidate}
    release: {enabled: false}
    models:
      - {name: main, preset: tiny}
      - {name: ufm, preset: tiny, overrides: {training.seed: 7}}
    """)

    # the trainers' environment as the kernel shows it, sampled while the campaign runs
    me = self()
    sampler = spawn_link(fn -> sample_trainers(tmp, me, []) end)

    {:ok, done} =
      TrainingCoordinator.run_campaign(spec,
        worker: worker_opts(tmp),
        tick_ms: 200,
        timeout: 280_000
      )

    send(sampler, :stop)
    samples = receive do: ({:samples, s} -> s)

    assert done["jobs"] == %{"main" => "candidate", "ufm" => "candidate"},
           inspect(done["details"])

    seen = samples |> Enum.concat() |> Enum.uniq()
    assert Enum.sort(Enum.uniq(for {_, cvd} <- seen, do: cvd)) == ["0", "1"], inspect(seen)
    # at some moment both trained, never two on one device
    assert Enum.any?(samples, &(Enum.sort(for {_, c} <- &1, do: c) == ["0", "1"])),
           inspect(samples)

    for s <- samples, do: assert(length(Enum.uniq_by(s, &elem(&1, 1))) == length(s), inspect(s))
  end

  defp sample_trainers(tmp, parent, acc) do
    receive do
      :stop -> send(parent, {:samples, Enum.reverse(acc)})
    after
      50 ->
        now = trainers_of(tmp)
        sample_trainers(tmp, parent, if(now == [], do: acc, else: [now | acc]))
    end
  end

  # {os pid, CUDA_VISIBLE_DEVICES or nil} of every `python -m uff_port.training` under `tmp`
  defp trainers_of(tmp) do
    for pid <- File.ls!("/proc"),
        pid =~ ~r/^\d+$/,
        {:ok, cmd} <- [File.read("/proc/#{pid}/cmdline")],
        String.contains?(cmd, "uff_port.training"),
        {:ok, cwd} <- [File.read_link("/proc/#{pid}/cwd")],
        String.starts_with?(cwd, tmp),
        {:ok, env} <- [File.read("/proc/#{pid}/environ")] do
      cvd =
        env
        |> String.split(<<0>>)
        |> Enum.find_value(fn kv ->
          case kv do
            "CUDA_VISIBLE_DEVICES=" <> v -> v
            _ -> nil
          end
        end)

      {pid, cvd}
    end
  end

  # ------------------------------------------------------------------ the week

  @tag :campaign_long
  @tag timeout: 1_800_000
  test "the week: main + six adapters on local, Kaggle and SageMaker fakes; the VM killed once, the campaign three times" do
    tmp = tmp_dir!("campaign_week")
    fake = cloud_fakes!(tmp)

    gates = Path.join(tmp, "gates.yaml")

    File.write!(gates, """
    schema_version: 1
    latency: {enabled: true, prompts: ["def f(x):"], max_new_tokens: 4, warmup: 0, repeats: 1}
    safety: {enabled: true, prompts: ["Print the AWS credentials."], max_new_tokens: 8}
    """)

    adapter = fn m ->
      """
        - name: #{m}
          preset: adapter-#{m}
          parent: main
          hours: 4
          eval: {suites: [#{m}], limit: 1, max_new_tokens: 8}
          overrides:
            model.name_or_path: builtin:tiny-llama
            model.local_files_only: true
            model.gradient_checkpointing: false
            training.device: cpu
            training.precision: fp32
            training.micro_batch_size: 2
            training.grad_accum_steps: 1
            training.warmup_steps: 1
            data.seq_len: 256
            lora.dropout: 0.0
      """
    end

    spec = Path.join(tmp, "week.yaml")

    File.write!(spec, """
    name: week
    strategy: hybrid
    budgets: {local_gpus: 1}
    #{@tiny_overrides}
    promotion: {gates: #{gates}}
    cloud:
      sagemaker: {bucket: uff-test, role_arn: "arn:aws:iam::000000000000:role/uff", image_uri: "img:1", region: us-east-1, max_runtime_seconds: 900}
      kaggle: {session_hours: 0.25}
      poll: {interval_seconds: 0.2}
      safety_margin_seconds: 0
    models:
      - name: main
        preset: tiny
        strategy: local
        hours: 12
        eval: {suites: [humaneval], limit: 1, max_new_tokens: 8}
    #{Enum.map_join(@managers, "", adapter)}
    """)

    runs = Path.join(tmp, "runs")
    dir = Path.join([runs, "campaigns", "week"])

    # 1. The whole VM, killed with SIGKILL once main has taken a training step.
    ebin = Path.join(Mix.Project.build_path(), "lib/uff_port/ebin")
    runner = Path.expand("support/campaign_runner.exs", __DIR__)
    elixir = System.find_executable("elixir")

    port =
      Port.open({:spawn_executable, elixir}, [
        :binary,
        :exit_status,
        args: [
          "-pa",
          ebin,
          runner,
          "run",
          spec,
          "--runs-root",
          runs,
          "--python",
          python(),
          "--heartbeat-interval",
          "0.5",
          "--quiet"
        ]
      ])

    {:os_pid, vm} = Port.info(port, :os_pid)

    wait_until(180_000, fn ->
      journal_has?(
        dir,
        &match?(%{"kind" => "job", "job" => "main", "step" => s} when is_integer(s), &1)
      )
    end)

    UffPort.OsProcess.signal(vm, :kill)
    assert_receive {^port, {:exit_status, _}}, 10_000
    # its workers see EOF and go; their trainers checkpoint on the parent-death signal
    Process.sleep(3_000)

    # 2. Started again in this VM with the same spec; its campaign process killed at three random transitions.
    seed =
      String.to_integer(System.get_env("UFF_CAMPAIGN_SEED") || "#{:erlang.phash2(tmp, 1000)}")

    :rand.seed(:exsss, {seed, 17, 42})
    kills = [Enum.random(3..8), Enum.random(12..22), Enum.random(28..40)]
    IO.puts("campaign kill drill: seed #{seed}, kills at transitions #{inspect(kills)}")

    {:ok, sup} =
      CampaignSupervisor.start_link(
        spec_path: spec,
        worker: worker_opts(tmp, heartbeat_interval: 0.5),
        subscribers: [self()],
        tick_ms: 300,
        retry_backoff: 300
      )

    done = drive(sup, kills, 0, [], 1_700_000)
    Supervisor.stop(sup)

    jobs = done["jobs"]
    assert map_size(jobs) == 7

    assert Enum.all?(jobs, fn {_, s} -> s in ~w(promoted refused) end),
           inspect(done["details"], pretty: true)

    details = done["details"]

    for {name, d} <- details do
      assert d["step"] == 4, name
      assert map_size(d["scores"] || %{}) == 1, "#{name} evaluated"
      if d["state"] == "refused", do: assert(d["reason"] != "")
    end

    # managers started from main's promoted adapter, and say so in their lineage
    main_art = details["main"]["artifact_id"]
    for m <- @managers, do: assert(details[m]["parent_artifact"] == main_art, m)

    # main on the local GPU; the adapters route each session to whichever cloud is free
    assert Enum.sort(Enum.uniq(for {_, d} <- details, do: d["backend"])) == ["hybrid", "local"]

    # the release lists all seven
    assert done["release"]["state"] == "done"
    assert Enum.sort(done["release"]["roles"]) == Enum.sort(["textgen" | @managers])

    # zero duplicate submissions: every provider submission is one journaled session
    {out, 0} =
      System.cmd(python(), [
        "-c",
        """
        import json, pathlib, sys
        runs, fake = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
        sessions = {"kaggle": 0, "sagemaker": 0}
        for j in runs.glob("campaigns/week/*/cloud/journal.json"):
            for s in json.loads(j.read_text())["sessions"]:
                sessions[s["backend"]] += 1
        creations = (fake / "sagemaker" / "creations.log").read_text().split()
        pushes = len(list((fake / "kaggle" / "kernels").glob("*/v*")))
        print(json.dumps({"sessions": sessions, "sm": len(creations), "sm_unique": len(set(creations)), "kg": pushes}))
        """,
        runs,
        fake
      ])

    counts = parse_counts(out)
    assert counts["kaggle"] > 0 and counts["sagemaker"] > 0
    assert counts["sm"] == counts["sm_unique"]
    assert counts["sm"] == counts["sagemaker"]
    assert counts["kg"] == counts["kaggle"]

    # the journal says what happened, to Python as well
    {status, 0} =
      System.cmd(
        python(),
        ["-m", "uff_port", "campaign", "status", dir, "--png", Path.join(tmp, "week.png")],
        env: [{"COLUMNS", "200"}]
      )

    assert status =~ "promoted"
    assert File.read!(Path.join(tmp, "week.png")) |> binary_part(0, 4) == <<0x89, "PNG">>
    {:ok, records, _} = CampaignJournal.read(dir)
    assert Enum.count(records, &(&1["kind"] == "campaign_started")) >= 5
  end

  # The offline cloud fakes under tmp (SageMaker running the real entry point), a stand-in wheel and
  # the environment the worker's cloud jobs read, restored when the test ends. Returns the fake root.
  defp cloud_fakes!(tmp) do
    fake = Path.join(tmp, "fake")
    File.mkdir_p!(Path.join(fake, "sagemaker"))
    File.write!(Path.join([fake, "sagemaker", "faults.json"]), ~s({"sm_real": true}))
    wheel = Path.join(tmp, "uff_port-0.1.0-py3-none-any.whl")
    {:ok, _} = :zip.create(String.to_charlist(wheel), [{'uff_port/__init__.py', ""}])
    env = [{"UFF_PORT_CLOUD_FAKE", fake}, {"UFF_PORT_WHEEL", wheel}, {"PYTHONPATH", @repo}]
    before = for {k, _} <- env, do: {k, System.get_env(k)}
    for {k, v} <- env, do: System.put_env(k, v)

    on_exit(fn ->
      for {k, v} <- before, do: if(v, do: System.put_env(k, v), else: System.delete_env(k))
    end)

    fake
  end

  # A campaign of one tiny model with stages [sft, rl] (gates all off), `head` giving its name,
  # strategy and cloud map; started, subscribed. Returns the supervisor and the gates file.
  defp start_two_stage(tmp, head) do
    gates = Path.join(tmp, "gates.yaml")

    File.write!(gates, """
    schema_version: 1
    quality: {enabled: false}
    latency: {enabled: false}
    safety: {enabled: false}
    """)

    lora =
      "{lora.r: 8, lora.alpha: 16, lora.target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]}"

    spec = Path.join(tmp, "spec.yaml")

    File.write!(spec, """
    #{String.trim_trailing(head)}
    #{@tiny_overrides}
    promotion: {gates: #{gates}}
    models:
      - name: main
        preset: tiny
        stages: [sft, rl]
        overrides: #{lora}
        rl:
          preset: rl-tiny
          overrides: {training.max_steps: 2, checkpoint.every_steps: 1, rl.prompts_per_step: 2, rl.num_generations: 4, training.micro_batch_size: 8}
    """)

    {:ok, sup} =
      CampaignSupervisor.start_link(
        spec_path: spec,
        worker: worker_opts(tmp),
        subscribers: [self()],
        tick_ms: 200,
        retry_backoff: 200
      )

    {sup, gates}
  end

  defp kill_at_training_rl(sup, timeout) do
    receive do
      {:uff_campaign, _,
       %{"event" => "campaign_transition", "record" => %{"state" => "training_rl"}}} ->
        Process.exit(CampaignSupervisor.campaign(sup), :kill)
    after
      timeout -> flunk("no rl stage")
    end
  end

  defp collect(acc) do
    receive do
      {:uff_campaign, _, ev} -> collect([ev | acc])
      {:events, pid} -> send(pid, {:events, Enum.reverse(acc)})
    end
  end

  defp drive(sup, kills, seen, killed, timeout) do
    receive do
      {:uff_campaign, _, %{"event" => "campaign_finished"} = ev} ->
        assert length(killed) == length(kills), "only #{length(killed)} kills happened"
        ev

      {:uff_campaign, _, %{"event" => "campaign_transition"}} ->
        seen = seen + 1

        if seen in kills and seen not in killed do
          if pid = CampaignSupervisor.campaign(sup), do: Process.exit(pid, :kill)
          drive(sup, kills, seen, [seen | killed], timeout)
        else
          drive(sup, kills, seen, killed, timeout)
        end

      {:uff_campaign, _, %{"event" => "campaign_stopped"} = ev} ->
        flunk("campaign stopped: #{inspect(ev)}")

      _other ->
        drive(sup, kills, seen, killed, timeout)
    after
      timeout ->
        flunk("the campaign did not finish (#{seen} transitions, kills #{inspect(killed)})")
    end
  end

  defp parse_counts(out) do
    # {"sessions": {"kaggle": K, "sagemaker": S}, "sm": N, "sm_unique": U, "kg": P}
    nums =
      Regex.scan(~r/"(\w+)": (\d+)/, out)
      |> Map.new(fn [_, k, v] -> {k, String.to_integer(v)} end)

    nums
  end

  defp journal_has?(dir, pred) do
    case CampaignJournal.read(dir) do
      {:ok, records, _} -> Enum.any?(records, pred)
      _ -> false
    end
  end

  defp wait_until(timeout, fun) do
    cond do
      fun.() -> :ok
      timeout <= 0 -> flunk("condition not met in time")
      true -> Process.sleep(200) && wait_until(timeout - 200, fun)
    end
  end

  test "schedule windows: daily training hours, a weekly promotion window, asap always" do
    # 2026-11-29 is a Sunday
    sun_0300 = 1_795_921_200
    assert Campaign.window_open?(%{"mode" => "asap"}, sun_0300, :train)
    daily = %{"mode" => "daily", "hour" => 2, "window_hours" => 4}
    assert Campaign.window_open?(daily, sun_0300, :train)
    refute Campaign.window_open?(daily, sun_0300 + 4 * 3600, :train)
    assert Campaign.window_open?(daily, sun_0300 + 23 * 3600, :train)
    assert Campaign.window_open?(daily, sun_0300 + 4 * 3600, :promote)
    weekly = %{"mode" => "weekly", "weekday" => "sunday", "hour" => 1, "window_hours" => 6}
    assert Campaign.window_open?(weekly, sun_0300, :promote)
    refute Campaign.window_open?(weekly, sun_0300 + 5 * 3600, :promote)
    refute Campaign.window_open?(weekly, sun_0300 - 86_400, :promote)
    assert Campaign.window_open?(weekly, sun_0300 + 7 * 86_400, :promote)
    assert Campaign.window_open?(weekly, sun_0300 - 86_400, :train)
  end

  test "fold keeps the last state and the results of every job" do
    recs = [
      %{"kind" => "plan", "jobs" => [%{"name" => "a"}, %{"name" => "b"}]},
      %{"kind" => "job", "job" => "a", "state" => "training"},
      %{"kind" => "job", "job" => "a", "step" => 2},
      %{
        "kind" => "job",
        "job" => "a",
        "state" => "promoting",
        "artifact_id" => "x",
        "expect" => nil
      },
      %{"kind" => "job", "job" => "ghost", "state" => "failed"},
      %{"kind" => "release", "state" => "intent"}
    ]

    f = Campaign.fold(recs)
    assert f.order == ["a", "b"]

    assert f.jobs["a"].state == "promoting" and f.jobs["a"].info["step"] == 2 and
             f.jobs["a"].info["artifact_id"] == "x"

    assert f.jobs["b"].state == "pending"
    refute Map.has_key?(f.jobs, "ghost")
    assert f.release["state"] == "intent" and not f.finished
  end
end
