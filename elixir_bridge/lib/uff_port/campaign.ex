defmodule UffPort.Campaign do
  @moduledoc """
  The week's training campaign: plan, train, evaluate, register, promote and
  fuse a release, without anybody driving it (docs/campaign.md).

      {:ok, summary} = UffPort.TrainingCoordinator.run_campaign("week.yaml", worker: [runs_root: "runs"])

  One GenServer under `UffPort.CampaignSupervisor`. On start it asks the
  worker for the plan (`campaign_plan`: the spec validated and placed on
  local, Kaggle or SageMaker), opens the journal (`UffPort.CampaignJournal`)
  and replays it. Each job goes through phases, each journaled *before* it
  is acted on:

      pending -> training -> evaluating -> registering -> promoting -> promoted | candidate | refused
                     \\-> waiting (a resumable failure, backed off) -> training

  A model with `stages: [sft, rl]` has two more phases between its SFT
  training and its evaluation: `registering_sft` (the SFT result registered,
  not promoted) and `training_rl` (the RL config, its adapter initialised from
  that SFT artifact, on its own run directory); the RL result is what is
  evaluated, registered and promoted.
      any phase -> failed (not resumable, with the reason); dependants -> skipped (with it)

  A phase runs in a linked step process; its result comes back as a message and
  is journaled as the next phase. Replaying a journal re-runs the current phase
  of every unfinished job, and every phase is safe to run again: `train` on the
  same run directory resumes from its checkpoint (a cloud job is found through
  its own journal, never submitted twice), `eval` rewrites its result,
  `register` of the same bytes is a no-op, and `promote` is a compare-and-swap
  against the alias value journaled with the intent (`expect`), so a promotion
  is never made twice. When the campaign process dies, its step processes and
  their workers stop with it (a training job checkpoints first).

  ## Options

    * `:spec_path` (required) - the campaign spec (YAML).
    * `:worker` - `UffPort.Worker` options for the control worker and every job's
      worker (`:runs_root`, `:python`, `:env`, ...).
    * `:subscribers` - pids sent `{:uff_campaign, name, event}`.
    * `:max_retries` (3), `:retry_backoff` (1000 ms, doubled per retry) - resumable failures,
      counted per job in the journal (a restarted campaign does not start the count again).
    * `:job` - extra `UffPort.TrainingCoordinator.run_job/3` options (`:max_restarts`, `:backoff`).
    * `:clock` - `fn -> unix seconds end` (schedule windows; tests compress time).
    * `:tick_ms` - how often a closed schedule window is looked at again (60 000).
    * `:call_timeout` - ms for eval/register/promote/release calls (1 800 000).

  ## Events

  `campaign_job_started` (`job`, `backend`, `attempt`, `stage`), `campaign_job_finished`
  (`job`, `stage`, `step`, `loss`), `campaign_job_promoted` (`job`, `artifact_id`,
  `alias`), `campaign_job_refused` (`job`, `artifact_id`, `reasons`, `gates`),
  `campaign_job_failed` / `campaign_job_skipped` (`job`, `reason`),
  `campaign_transition` (`record`: every journal record as written),
  `campaign_finished` (`jobs`: name -> state, `release`), `campaign_stopped` (`reason`).
  """

  use GenServer, restart: :transient, shutdown: 180_000

  require Logger

  alias UffPort.{CampaignJournal, Error, TrainingCoordinator, Worker}

  @terminal ~w(promoted candidate refused failed skipped)
  @training ~w(training training_rl)
  @verdict_ok ~w(promoted candidate)
  @call_timeout 1_800_000

  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts), do: GenServer.start_link(__MODULE__, opts, Keyword.take(opts, [:name]))

  @doc "The campaign's current view: jobs with their phase and results."
  @spec snapshot(GenServer.server()) :: map
  def snapshot(c), do: GenServer.call(c, :snapshot)

  @doc "Job states folded from journal records (also what `mix uff.campaign status` shows)."
  @spec fold([map]) :: %{
          jobs: map,
          order: [String.t()],
          release: map | nil,
          finished: boolean,
          plan: map | nil
        }
  def fold(records) do
    Enum.reduce(records, %{jobs: %{}, order: [], release: nil, finished: false, plan: nil}, fn
      %{"kind" => "plan", "jobs" => jobs} = rec, acc when is_list(jobs) and is_nil(acc.plan) ->
        names = for %{"name" => n} <- jobs, do: n
        jmap = Map.new(jobs, fn j -> {j["name"], %{plan: j, state: "pending", info: %{}}} end)
        %{acc | jobs: jmap, order: names, plan: rec}

      %{"kind" => "job", "job" => name} = rec, acc when is_map_key(acc.jobs, name) ->
        update_in(acc, [:jobs, name], fn j ->
          base = if is_binary(rec["state"]), do: Map.delete(j.info, "reason"), else: j.info
          info = Map.merge(base, Map.drop(rec, ~w(kind job state seq t)))
          %{j | state: rec["state"] || j.state, info: info}
        end)

      %{"kind" => "release"} = rec, acc ->
        %{acc | release: rec}

      %{"kind" => "campaign_finished"}, acc ->
        %{acc | finished: true}

      _, acc ->
        acc
    end)
  end

  # ------------------------------------------------------------------ server

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    spec = Keyword.fetch!(opts, :spec_path)
    worker = Keyword.get(opts, :worker, [])

    state = %{
      opts: opts,
      spec_path: Path.expand(spec),
      worker_opts: worker,
      runs_root: Path.expand(Keyword.get(worker, :runs_root, "runs")),
      subscribers: Keyword.get(opts, :subscribers, []),
      clock: Keyword.get(opts, :clock, fn -> System.os_time(:millisecond) / 1000 end),
      control: nil,
      journal: nil,
      name: nil,
      plan: nil,
      jobs: %{},
      order: [],
      steps: %{},
      retries: %{},
      holds: %{},
      gpus: %{},
      release: nil,
      finished: false
    }

    {:ok, state, {:continue, :start}}
  end

  @impl true
  def handle_continue(:start, state) do
    control_opts = Keyword.drop(state.worker_opts, [:subscribers, :name, :job])

    with {:ok, control} <- Worker.start_link(control_opts),
         state = %{state | control: control},
         {:ok, plan} <-
           Worker.request(control, "campaign_plan", %{"spec_path" => state.spec_path},
             timeout: 300_000
           ),
         dir = Path.join(state.runs_root, plan["campaign_dir"]),
         {:ok, journal, records} <- CampaignJournal.open(dir) do
      state = %{state | journal: journal, name: plan["name"]}
      {:noreply, replay(state, plan, records) |> advance()}
    else
      {:error, reason} ->
        reason = describe(reason)
        Logger.error("campaign cannot start: #{reason}")
        notify(state, "campaign_stopped", %{"reason" => reason})
        {:stop, {:shutdown, {:campaign_refused, reason}}, state}
    end
  end

  @impl true
  def handle_call(:snapshot, _from, state) do
    {:reply,
     %{name: state.name, jobs: details(state), release: state.release, finished: state.finished},
     state}
  end

  @impl true
  def handle_info({:step_done, pid, job, phase, result}, state) do
    case Map.pop(state.steps, pid) do
      {{^job, ^phase}, steps} ->
        {:noreply, %{state | steps: steps} |> on_result(job, phase, result) |> advance()}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info({:progress, job, key, step}, state) when is_map_key(state.jobs, job) do
    {:noreply, record(state, %{"kind" => "job", "job" => job, key => step})}
  end

  def handle_info({:EXIT, pid, reason}, state) do
    cond do
      pid == state.control ->
        {:stop, {:control_worker_down, reason}, state}

      Map.has_key?(state.steps, pid) ->
        {{job, phase}, steps} = Map.pop(state.steps, pid)
        result = {:retry, "#{phase} step crashed: #{describe(reason)}"}
        {:noreply, %{state | steps: steps} |> on_result(job, phase, result) |> advance()}

      true ->
        {:noreply, state}
    end
  end

  def handle_info(:tick, state), do: {:noreply, advance(state)}
  def handle_info(_msg, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    # Steps trap nothing but the training runner; it stops its job on our exit.
    if state.journal, do: CampaignJournal.close(state.journal)
    :ok
  end

  # ------------------------------------------------------------------ replay

  defp replay(state, plan, []) do
    state =
      state
      |> record(%{
        "kind" => "campaign_started",
        "name" => plan["name"],
        "spec_path" => state.spec_path,
        "budgets" => plan["budgets"]
      })
      |> record(
        Map.put(Map.take(plan, ~w(jobs schedule promotion release placement)), "kind", "plan")
      )

    folded = fold([%{"kind" => "plan", "jobs" => plan["jobs"]}])
    %{state | plan: plan, jobs: folded.jobs, order: folded.order}
  end

  defp replay(state, plan, records) do
    folded = fold(records)
    # The journal's plan is the campaign's: a spec edited in between does not re-place jobs.
    journaled = folded.plan || %{"jobs" => plan["jobs"]}
    plan = Map.merge(plan, Map.take(journaled, ~w(jobs schedule promotion release placement)))

    retries =
      for {n, j} <- folded.jobs,
          is_integer(j.info["retries"]),
          into: %{},
          do: {n, j.info["retries"]}

    state = %{
      state
      | plan: plan,
        jobs: folded.jobs,
        order: folded.order,
        release: folded.release,
        finished: folded.finished,
        retries: retries
    }

    record(state, %{
      "kind" => "campaign_started",
      "name" => plan["name"],
      "spec_path" => state.spec_path,
      "budgets" => plan["budgets"],
      "recovered" => true
    })
  end

  # ------------------------------------------------------------------ scheduling

  defp advance(%{finished: true} = state) do
    notify_finished(state)
    state
  end

  defp advance(state) do
    state = Enum.reduce(state.order, state, &advance_job/2)

    cond do
      map_size(state.steps) > 0 ->
        state

      Enum.all?(state.jobs, fn {_, j} -> j.state in @terminal end) ->
        finish(state)

      true ->
        # something waits: a closed window, a backoff, a dependency
        Process.send_after(self(), :tick, Keyword.get(state.opts, :tick_ms, 60_000))
        state
    end
  end

  defp busy?(state, name), do: Enum.any?(state.steps, fn {_, {j, _}} -> j == name end)

  defp advance_job(name, state) do
    job = state.jobs[name]

    cond do
      job.state in @terminal or busy?(state, name) ->
        state

      is_map_key(state.holds, name) and System.monotonic_time(:millisecond) < state.holds[name] ->
        state

      job.state == "pending" ->
        start_pending(state, name, job)

      job.state == "waiting" ->
        if state.clock.() >= (job.info["retry_at"] || 0),
          do: start_training(state, name, job, false, job.info["resume"] || "training"),
          else: state

      job.state in @training ->
        # journaled but not running: a recovery; it resumes on the same run directory
        if slot_free?(state, job), do: spawn_step(state, name, job.state), else: state

      job.state == "promoting" and not window_open?(state, :promote) ->
        state

      job.state in ~w(evaluating registering_sft registering promoting) ->
        spawn_step(state, name, job.state)

      true ->
        state
    end
  end

  defp start_pending(state, name, job) do
    deps = job.plan["deps"] || []
    dep_states = Enum.map(deps, fn d -> {d, state.jobs[d]} end)

    cond do
      job.plan["backend"] in [nil, ""] ->
        fail(state, name, "skipped", job.plan["unplaced_reason"] || "no backend could take it")

      Enum.any?(dep_states, fn {_, d} -> d.state not in @terminal end) ->
        state

      not window_open?(state, :train) ->
        state

      true ->
        start_training(state, name, job, true, "training")
    end
  end

  defp start_training(state, name, job, fresh?, phase) do
    if slot_free?(state, job) do
      state
      |> record(%{"kind" => "job", "job" => name, "state" => phase, "fresh" => fresh?})
      |> spawn_step(name, phase)
    else
      state
    end
  end

  # One local job per GPU; one session per cloud backend, and a `hybrid` job (its worker routes
  # each session to whichever cloud has budget and no other session) takes any free cloud.
  @clouds ~w(kaggle sagemaker hybrid)

  defp slot_free?(state, job) do
    backend = job.plan["backend"]

    training = for {_, {j, p}} <- state.steps, p in @training, do: state.jobs[j].plan["backend"]

    if backend == "local" do
      Enum.count(training, &(&1 == "local")) <
        max(1, get_in(state.plan, ["budgets", "local_gpus"]) || 1)
    else
      Enum.count(training, &(&1 in @clouds)) < 2 and
        (backend == "hybrid" or backend not in training)
    end
  end

  defp window_open?(state, phase),
    do: window_open?(state.plan["schedule"] || %{}, state.clock.(), phase)

  @doc """
  Whether `phase` (`:train` or `:promote`) may start at `now` (unix seconds)
  under `schedule` (the spec's map): `daily` opens training from `hour` UTC
  for `window_hours` every day; `weekly` opens promotion on `weekday` at
  `hour` for `window_hours`; everything else is always open.
  """
  @spec window_open?(map, number, :train | :promote) :: boolean
  def window_open?(schedule, now, phase) do
    hour = schedule["hour"] || 0
    width = (schedule["window_hours"] || 24) * 3600

    case {schedule["mode"], phase} do
      {"daily", :train} ->
        since(now, hour * 3600, 86_400) < width

      {"weekly", :promote} ->
        # 1970-01-01 was a Thursday (index 3 counting from Monday)
        days = ~w(monday tuesday wednesday thursday friday saturday sunday)
        wd = Enum.find_index(days, &(&1 == schedule["weekday"])) || 6
        since(now, (wd - 3) * 86_400 + hour * 3600, 7 * 86_400) < width

      _ ->
        true
    end
  end

  defp since(now, opens, period) do
    s = :math.fmod(now - opens, period)
    if s < 0, do: s + period, else: s
  end

  # ------------------------------------------------------------------ steps

  defp spawn_step(state, name, phase) do
    me = self()
    ctx = step_context(state, name, phase)

    state =
      if phase in @training, do: %{state | gpus: Map.put(state.gpus, name, ctx.gpu)}, else: state

    pid =
      spawn_link(fn ->
        result =
          try do
            run_step(phase, ctx)
          rescue
            e -> {:retry, Exception.message(e)}
          end

        send(me, {:step_done, self(), name, phase, result})
      end)

    state = %{state | steps: Map.put(state.steps, pid, {name, phase})}

    if phase in @training do
      job = state.jobs[name]
      attempt = Map.get(state.retries, name, 0) + 1

      notify(state, "campaign_job_started", %{
        "job" => name,
        "backend" => job.plan["backend"],
        "attempt" => attempt,
        "stage" => if(phase == "training_rl", do: "rl", else: "sft")
      })
    end

    state
  end

  defp step_context(state, name, phase) do
    job = state.jobs[name]
    parent = job.plan["parent"]

    %{
      campaign: self(),
      name: name,
      phase: phase,
      job: job,
      parent: parent && Map.put(state.jobs[parent], :name, parent),
      control: state.control,
      runs_root: state.runs_root,
      worker_opts: state.worker_opts,
      job_opts: Keyword.get(state.opts, :job, []),
      gpu: gpu_for(state, job),
      promotion: state.plan["promotion"] || %{},
      timeout: Keyword.get(state.opts, :call_timeout, @call_timeout)
    }
  end

  defp gpu_for(state, %{plan: %{"backend" => "local"}}) do
    gpus = get_in(state.plan, ["budgets", "local_gpus"]) || 0

    if gpus > 1 do
      used = for {_, {j, p}} <- state.steps, p in @training, do: state.gpus[j]
      Enum.find(0..(gpus - 1), fn i -> i not in used end)
    end
  end

  defp gpu_for(_state, _job), do: nil

  defp run_step(phase, ctx) when phase in @training do
    with {:ok, init} <- init_adapter(phase, ctx) do
      {stage, run_dir, key} =
        if phase == "training_rl",
          do: {ctx.job.plan["rl"]["train"], ctx.job.plan["rl"]["run_dir"], "rl_step"},
          else: {ctx.job.plan["train"], ctx.job.plan["run_dir"], "step"}

      overrides = stage["overrides"] || %{}
      overrides = if init, do: Map.put(overrides, "model.init_adapter", init), else: overrides

      train = %{
        "config_path" => stage["config_path"],
        "overrides" => overrides,
        "run_dir" => run_dir
      }

      worker =
        if ctx.gpu,
          do: Keyword.put(ctx.worker_opts, :cuda_visible_devices, "#{ctx.gpu}"),
          else: ctx.worker_opts

      campaign = ctx.campaign
      name = ctx.name

      on_event = fn _attempt, ev ->
        if ev["event"] == "checkpoint" and is_integer(ev["step"]),
          do: send(campaign, {:progress, name, key, ev["step"]})
      end

      opts =
        [worker: worker, owner: campaign, on_event: on_event, max_restarts: 3, max_seconds: 60]
        |> Keyword.merge(ctx.job_opts)

      case TrainingCoordinator.run_job(train, :local, opts) do
        {:ok, s} when phase == "training_rl" ->
          {:ok, %{"rl_step" => s.final_step, "rl_loss" => s.final_loss}}

        {:ok, s} ->
          {:ok,
           %{
             "step" => s.final_step,
             "loss" => s.final_loss,
             "parent_artifact" => init && Path.basename(init)
           }}

        {:error, {{:train_refused, %Error{} = e}, _}} ->
          {:fail, "train refused: #{e.code}: #{e.message}"}

        # A trainer that died (a signal, a crash) before its first checkpoint is not
        # resumable for the worker, but a fresh start may well succeed: retried, bounded.
        {:error, {{:job_failed, %{"code" => "trainer_failed"} = info}, _}} ->
          {:retry, "job failed: #{describe(info)}"}

        {:error, {{:job_failed, info}, _}} ->
          {:fail, "job failed: #{describe(info)}"}

        {:error, {{:owner_down, _}, _}} ->
          {:retry, "campaign stopped"}

        {:error, {reason, _}} ->
          {:retry, describe(reason)}
      end
    end
  end

  defp run_step("evaluating", ctx) do
    ev = ctx.job.plan["eval"]

    Enum.reduce_while(ev["suites"] || [], {:ok, %{}}, fn suite, {:ok, acc} ->
      args =
        %{
          "suite" => suite,
          "target" => final_run_dir(ctx.job.plan),
          "n" => ev["n"] || 1,
          "max_new_tokens" => ev["max_new_tokens"] || 128,
          "timeout" => ev["timeout"] || 10.0
        }
        |> then(fn a -> if ev["limit"], do: Map.put(a, "limit", ev["limit"]), else: a end)

      case Worker.request(ctx.control, "eval", args, timeout: ctx.timeout) do
        {:ok, res} ->
          {:cont, {:ok, Map.put(acc, suite, res["metrics"] || %{})}}

        {:error, %Error{code: :worker_down} = e} ->
          {:halt, {:retry, "eval #{suite}: #{e.message}"}}

        {:error, e} ->
          {:halt, {:fail, "eval #{suite}: #{describe(e)}"}}
      end
    end)
  end

  defp run_step("registering_sft", ctx) do
    # registered, not promoted: the RL stage starts from it and names it as its lineage.parent
    args = %{"run_dir" => ctx.job.plan["run_dir"], "role" => ctx.job.plan["role"]}

    case Worker.request(ctx.control, "register", args, timeout: ctx.timeout) do
      {:ok, reg} -> {:ok, %{"sft_artifact_id" => reg["artifact_id"]}}
      {:error, %Error{code: :worker_down} = e} -> {:retry, "register sft: #{e.message}"}
      {:error, e} -> {:fail, "register sft: #{describe(e)}"}
    end
  end

  defp run_step("registering", ctx) do
    role = ctx.job.plan["role"]
    target = target_alias(ctx)

    with {:ok, reg} <-
           Worker.request(
             ctx.control,
             "register",
             %{"run_dir" => final_run_dir(ctx.job.plan), "role" => role},
             timeout: ctx.timeout
           ),
         {:ok, view} <-
           Worker.request(ctx.control, "releases", %{"role" => role}, timeout: ctx.timeout) do
      {:ok,
       %{"artifact_id" => reg["artifact_id"], "expect" => get_in(view, ["aliases", role, target])}}
    else
      {:error, %Error{code: :worker_down} = e} -> {:retry, "register: #{e.message}"}
      {:error, e} -> {:fail, "register: #{describe(e)}"}
    end
  end

  defp run_step("promoting", ctx) do
    role = ctx.job.plan["role"]
    target = target_alias(ctx)
    art = ctx.job.info["artifact_id"]

    args =
      %{"artifact" => art, "to" => target, "expect" => ctx.job.info["expect"]}
      |> with_gates(ctx.job.plan["gates"])

    case Worker.request(ctx.control, "promote", args, timeout: ctx.timeout) do
      {:ok, out} ->
        {:ok, %{"verdict" => verdict(target), "gates" => out["gates"] || []}}

      {:error, %Error{code: :gate_failed} = e} ->
        gates = (is_map(e.details) && e.details["gates"]) || []
        {:ok, %{"verdict" => "refused", "reason" => e.message, "gates" => gates}}

      {:error, %Error{code: :alias_conflict} = e} ->
        # Our own promotion may have landed before the campaign died: the CAS tells.
        case Worker.request(ctx.control, "releases", %{"role" => role}, timeout: ctx.timeout) do
          {:ok, view} ->
            if get_in(view, ["aliases", role, target]) == art,
              do: {:ok, %{"verdict" => verdict(target), "gates" => [], "recovered" => true}},
              else:
                {:ok,
                 %{
                   "verdict" => "refused",
                   "reason" => "#{target} moved by someone else: #{e.message}",
                   "gates" => []
                 }}

          {:error, e2} ->
            {:retry, "releases: #{describe(e2)}"}
        end

      {:error, %Error{code: :worker_down} = e} ->
        {:retry, "promote: #{e.message}"}

      {:error, e} ->
        {:fail, "promote: #{describe(e)}"}
    end
  end

  defp run_step("release", ctx) do
    case Worker.request(ctx.control, "campaign_release", ctx.args, timeout: ctx.timeout) do
      {:ok, rel} ->
        {:ok, Map.take(rel, ~w(name path roles missing release_id created kept version))}

      {:error, e} ->
        {:fail, describe(e)}
    end
  end

  # a plan carries its gates as a map; a journal from before that, as a path under the runs root
  defp with_gates(args, g) when is_map(g), do: Map.put(args, "gates_config", g)
  defp with_gates(args, g) when is_binary(g), do: Map.put(args, "gates", g)
  defp with_gates(args, _), do: args

  defp final_run_dir(%{"rl" => %{"run_dir" => dir}}), do: dir
  defp final_run_dir(plan), do: plan["run_dir"]

  defp target_alias(ctx),
    do: if(ctx.promotion["policy"] == "candidate", do: "candidate", else: "stable")

  defp verdict("candidate"), do: "candidate"
  defp verdict(_), do: "promoted"

  defp init_adapter("training_rl", ctx) do
    case ctx.job.info["sft_artifact_id"] do
      art when is_binary(art) -> {:ok, artifact_dir(ctx, art)}
      _ -> {:fail, "rl stage: no registered sft artifact to start from"}
    end
  end

  defp init_adapter(_phase, ctx), do: parent_adapter(ctx)

  defp artifact_dir(ctx, art) do
    root = System.get_env("UFF_PORT_REGISTRY") || Path.join(ctx.runs_root, "registry")
    Path.join([Path.expand(root), "artifacts", art])
  end

  # The parent's newest promoted adapter: this campaign's, else the registry's stable one.
  defp parent_adapter(%{parent: nil}), do: {:ok, nil}

  defp parent_adapter(%{parent: parent} = ctx) do
    art =
      if parent.state in @verdict_ok do
        parent.info["artifact_id"]
      else
        role = parent.plan["role"]

        case Worker.request(ctx.control, "releases", %{"role" => role}, timeout: ctx.timeout) do
          {:ok, view} -> get_in(view, ["aliases", role, "stable"])
          _ -> nil
        end
      end

    if art do
      {:ok, artifact_dir(ctx, art)}
    else
      why = parent.info["reason"] || parent.state

      {:skip,
       "parent #{parent.name} #{parent.state} (#{why}) and no promoted #{parent.plan["role"]} adapter to start from"}
    end
  end

  # ------------------------------------------------------------------ results

  defp on_result(state, "__release__", "release", {:ok, rel}) do
    state
    |> record(Map.merge(rel, %{"kind" => "release", "state" => "done"}))
    |> Map.update!(:release, fn _ -> Map.put(rel, "state", "done") end)
  end

  defp on_result(state, "__release__", "release", {:fail, why}) do
    state
    |> record(%{"kind" => "release", "state" => "failed", "reason" => why})
    |> Map.put(:release, %{"state" => "failed", "reason" => why})
  end

  defp on_result(state, job, phase, {:ok, res}) when phase in @training do
    plan = state.jobs[job].plan

    next =
      cond do
        phase == "training" and is_map(plan["rl"]) -> "registering_sft"
        plan["eval"] -> "evaluating"
        true -> "registering"
      end

    notify(state, "campaign_job_finished", %{
      "job" => job,
      "stage" => if(phase == "training_rl", do: "rl", else: "sft"),
      "step" => res["step"] || res["rl_step"],
      "loss" => res["loss"] || res["rl_loss"]
    })

    record(state, Map.merge(res, %{"kind" => "job", "job" => job, "state" => next}))
  end

  defp on_result(state, job, "evaluating", {:ok, scores}),
    do:
      record(state, %{"kind" => "job", "job" => job, "state" => "registering", "scores" => scores})

  # journaled before it runs; advance/1 starts it when its backend has a slot (as on a recovery)
  defp on_result(state, job, "registering_sft", {:ok, reg}),
    do:
      record(
        state,
        Map.merge(reg, %{"kind" => "job", "job" => job, "state" => "training_rl", "fresh" => true})
      )

  defp on_result(state, job, "registering", {:ok, reg}),
    do: record(state, Map.merge(reg, %{"kind" => "job", "job" => job, "state" => "promoting"}))

  defp on_result(state, job, "promoting", {:ok, %{"verdict" => "refused"} = out}) do
    art = state.jobs[job].info["artifact_id"]
    reasons = for %{"status" => "fail"} = g <- out["gates"], do: "#{g["gate"]}: #{g["detail"]}"
    reasons = if reasons == [], do: [out["reason"]], else: reasons

    notify(state, "campaign_job_refused", %{
      "job" => job,
      "artifact_id" => art,
      "reasons" => reasons,
      "gates" => out["gates"]
    })

    record(state, %{
      "kind" => "job",
      "job" => job,
      "state" => "refused",
      "reason" => Enum.join(reasons, "; "),
      "gates" => out["gates"]
    })
  end

  defp on_result(state, job, "promoting", {:ok, out}) do
    art = state.jobs[job].info["artifact_id"]

    notify(state, "campaign_job_promoted", %{
      "job" => job,
      "artifact_id" => art,
      "alias" => out["verdict"]
    })

    record(state, %{
      "kind" => "job",
      "job" => job,
      "state" => out["verdict"],
      "gates" => out["gates"]
    })
  end

  defp on_result(state, job, _phase, {:skip, why}), do: fail(state, job, "skipped", why)
  defp on_result(state, job, _phase, {:fail, why}), do: fail(state, job, "failed", why)

  # The count is journaled with the retry, so a restarted campaign goes on counting.
  defp on_result(state, job, phase, {:retry, why}) do
    n = Map.get(state.retries, job, 0) + 1
    state = %{state | retries: Map.put(state.retries, job, n)}

    cond do
      n > Keyword.get(state.opts, :max_retries, 3) ->
        fail(state, job, "failed", "#{why} (gave up after #{n - 1} retries)")

      phase in @training ->
        delay = Keyword.get(state.opts, :retry_backoff, 1000) * Integer.pow(2, n - 1)
        Process.send_after(self(), :tick, delay)

        record(state, %{
          "kind" => "job",
          "job" => job,
          "state" => "waiting",
          "reason" => why,
          "resume" => phase,
          "retries" => n,
          "retry_at" => state.clock.() + delay / 1000
        })

      true ->
        # other phases are re-run in place after the back-off
        delay = Keyword.get(state.opts, :retry_backoff, 1000) * n
        Process.send_after(self(), :tick, delay + 1)
        state = record(state, %{"kind" => "job", "job" => job, "retries" => n})
        %{state | holds: Map.put(state.holds, job, System.monotonic_time(:millisecond) + delay)}
    end
  end

  # Dependants of a failed job are decided when their turn comes (the training step looks
  # for the parent's newest promoted adapter): skipped with this reason when there is none.
  defp fail(state, job, kind, why) do
    notify(state, "campaign_job_#{kind}", %{"job" => job, "reason" => why})
    record(state, %{"kind" => "job", "job" => job, "state" => kind, "reason" => why})
  end

  defp finish(%{release: %{"state" => s}} = state) when s in ["done", "failed"] do
    state = record(state, %{"kind" => "campaign_finished", "jobs" => job_states(state)})
    state = %{state | finished: true}
    notify_finished(state)
    state
  end

  defp finish(state) do
    enabled = get_in(state.plan, ["release", "enabled"]) != false
    # every role: one without a stable artifact is named in the release's `missing`
    roles = for n <- state.order, do: state.jobs[n].plan["role"]

    if enabled do
      args = %{
        "roles" => Enum.uniq(roles),
        "campaign" => state.name,
        "keep" => get_in(state.plan, ["promotion", "keep_releases"]) || 3
      }

      args =
        if v = get_in(state.plan, ["release", "version"]),
          do: Map.put(args, "version", v),
          else: args

      state =
        if state.release,
          do: state,
          else:
            record(state, %{"kind" => "release", "state" => "intent", "roles" => args["roles"]})

      state = %{state | release: state.release || %{"state" => "intent"}}
      me = self()

      ctx = %{
        control: state.control,
        args: args,
        timeout: Keyword.get(state.opts, :call_timeout, @call_timeout)
      }

      pid =
        spawn_link(fn ->
          result =
            try do
              run_step("release", ctx)
            rescue
              e -> {:fail, Exception.message(e)}
            end

          send(me, {:step_done, self(), "__release__", "release", result})
        end)

      %{state | steps: Map.put(state.steps, pid, {"__release__", "release"})}
    else
      finish(%{state | release: %{"state" => "done", "skipped" => true}})
    end
  end

  defp details(state) do
    Map.new(state.jobs, fn {n, j} ->
      {n,
       Map.merge(j.info, %{
         "state" => j.state,
         "backend" => j.plan["backend"],
         "role" => j.plan["role"],
         "max_steps" => j.plan["max_steps"]
       })}
    end)
  end

  defp job_states(state), do: Map.new(state.jobs, fn {n, j} -> {n, j.state} end)

  defp notify_finished(state) do
    notify(state, "campaign_finished", %{
      "jobs" => job_states(state),
      "release" => state.release,
      "details" => details(state)
    })
  end

  # ------------------------------------------------------------------ journal + events

  defp record(state, rec) do
    {:ok, journal, full} = CampaignJournal.append(state.journal, rec)
    state = %{state | journal: journal}
    notify(state, "campaign_transition", %{"record" => full})

    case rec do
      %{"kind" => "job", "job" => name, "state" => s} when is_binary(s) ->
        # a reason belongs to the state it came with (a retried job's old failure is history)
        update_in(state, [:jobs, name], fn j ->
          %{
            j
            | state: s,
              info: Map.merge(Map.delete(j.info, "reason"), Map.drop(rec, ~w(kind job state)))
          }
        end)

      %{"kind" => "job", "job" => name} ->
        update_in(state, [:jobs, name], fn j ->
          %{j | info: Map.merge(j.info, Map.drop(rec, ~w(kind job)))}
        end)

      _ ->
        state
    end
  end

  defp notify(state, event, fields) do
    msg = {:uff_campaign, state.name, Map.put(fields, "event", event)}
    for s <- state.subscribers, do: send(s, msg)
    :ok
  end

  defp describe(%Error{code: code, message: msg}), do: "#{code}: #{msg}"
  defp describe({:start_failed, %Error{} = e}), do: describe(e)
  defp describe(%{"code" => c, "message" => m}), do: "#{c}: #{m}"
  defp describe(bin) when is_binary(bin), do: bin
  defp describe(other), do: inspect(other, limit: 20, printable_limit: 300)
end
