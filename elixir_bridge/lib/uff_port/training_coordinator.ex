defmodule UffPort.TrainingCoordinator do
  @moduledoc """
  Runs one training cycle under supervision and reports what happened.

      {:ok, summary} = UffPort.TrainingCoordinator.run_training_cycle("data/ufm.jsonl", :local)
      summary.final_step   #=> 60
      summary.attempts     #=> [%{attempt: 1, ...}]

  A `UffPort.JobSupervisor` starts the worker with the job; if the worker
  crashes, the supervisor restarts it and the job resumes from its last durable
  checkpoint, all within one call. `:local` trains on this machine; `:kaggle`,
  `:sagemaker` and `:hybrid` send the same `train` with `"strategy"` set in the
  config, and the worker runs the job through its cloud backend (a `:hybrid`
  job trains locally when a GPU is present and goes to the cloud otherwise).

  ## Options

    * `:config` - `config_path` sent to the worker: a YAML file or preset name
      (default `"tiny"`).
    * `:run_dir` - run directory under the runs root (default: generated).
    * `:overrides` - extra dotted-key overrides (`%{"training.max_steps" => 40}`).
    * `:worker` - `UffPort.Worker` options (`:runs_root`, `:python`, timeouts...).
    * `:max_restarts`, `:max_seconds`, `:backoff` - see `UffPort.JobSupervisor`.
    * `:on_event` - `fn attempt, event -> any end`, called for every event (progress printing).
    * `:inject_crash_at` - SIGKILL the worker OS process at the first progress
      event of attempt 1 whose step is >= this (the crash drill).
    * `:timeout` - ms for the whole cycle (default `:infinity`).
    * `:owner` - a linked pid whose exit stops the job (checkpoint, then the worker
      exits): a campaign's job runner dies with its campaign.

  ## Errors

  `{:error, {reason, summary}}` with `reason` one of `{:train_refused, %UffPort.Error{}}`,
  `{:job_failed, event}` (not resumable), `{:supervisor_gave_up, exit_reason}`,
  `:timeout`; `summary` holds what was seen until then.
  """

  alias UffPort.{JobSupervisor, OsProcess}

  @strategies [:local, :kaggle, :sagemaker, :hybrid]

  @type strategy :: :local | :kaggle | :sagemaker | :hybrid
  @type attempt :: %{
          attempt: pos_integer,
          os_pid: pos_integer | nil,
          resumed_from: non_neg_integer | nil,
          first_step: non_neg_integer | nil,
          last_step: non_neg_integer | nil,
          down: term
        }
  @type summary :: %{
          job_id: String.t() | nil,
          run_dir: String.t() | nil,
          strategy: strategy,
          attempts: [attempt],
          final_step: non_neg_integer | nil,
          final_loss: float | nil,
          eval_loss: float | nil,
          losses: [{pos_integer, non_neg_integer, float}],
          injected_at: non_neg_integer | nil,
          recovery_ms: non_neg_integer | nil,
          elapsed_ms: non_neg_integer
        }

  @doc """
  Trains on `data_path` (a JSONL file or a list of them; nil keeps the config's
  data) with `strategy`. Blocks until the job finishes or fails for good.
  """
  @spec run_training_cycle(String.t() | [String.t()] | nil, strategy, keyword) ::
          {:ok, summary} | {:error, {term, summary}}
  def run_training_cycle(data_path, strategy \\ :local, opts \\ []) do
    unless strategy in @strategies,
      do:
        raise(
          ArgumentError,
          "strategy must be one of #{inspect(@strategies)}, got #{inspect(strategy)}"
        )

    overrides =
      Keyword.get(opts, :overrides, %{})
      |> Map.put("strategy", Atom.to_string(strategy))
      |> then(fn o -> if data_path, do: Map.put(o, "data.path", data_path), else: o end)

    job =
      %{"config_path" => Keyword.get(opts, :config, "tiny"), "overrides" => overrides}
      |> then(fn j -> if rd = opts[:run_dir], do: Map.put(j, "run_dir", rd), else: j end)

    run_job(job, strategy, opts)
  end

  @doc """
  Runs a campaign spec (docs/campaign.md) under its own supervisor and blocks
  until it has finished: every job trained, evaluated, promoted or refused, the
  release fused. Returns `{:ok, summary}` (the campaign's final view) or
  `{:error, reason}`. Options as `UffPort.Campaign` (`:worker`, `:subscribers`,
  ...), plus `:timeout` (ms, default `:infinity`).
  """
  @spec run_campaign(String.t(), keyword) :: {:ok, map} | {:error, term}
  def run_campaign(spec_path, opts \\ []) do
    trap = Process.flag(:trap_exit, true)
    opts = Keyword.update(opts, :subscribers, [self()], &[self() | &1])

    try do
      case UffPort.CampaignSupervisor.start_link([{:spec_path, spec_path} | opts]) do
        {:ok, sup} ->
          result = await_campaign(sup, Keyword.get(opts, :timeout, :infinity))
          stop_supervisor(sup)
          result

        {:error, reason} ->
          {:error, {:start_failed, reason}}
      end
    after
      Process.flag(:trap_exit, trap)
    end
  end

  defp await_campaign(sup, timeout) do
    receive do
      {:uff_campaign, _name, %{"event" => "campaign_finished"} = ev} ->
        {:ok, ev}

      {:uff_campaign, _name, %{"event" => "campaign_stopped"} = ev} ->
        {:error, {:campaign_stopped, ev}}

      {:uff_campaign, _name, _ev} ->
        await_campaign(sup, timeout)

      {:EXIT, ^sup, reason} ->
        {:error, {:supervisor_gave_up, reason}}
    after
      timeout -> {:error, :timeout}
    end
  end

  @doc "Like `run_training_cycle/3` for ready `train` args (`config` or `config_path`, ...)."
  @spec run_job(map, strategy, keyword) :: {:ok, summary} | {:error, {term, summary}}
  def run_job(job, strategy \\ :local, opts \\ []) do
    # Trap exits for the cycle only: a supervisor that gives up must come back as a
    # value, not take the caller down with it.
    trap = Process.flag(:trap_exit, true)
    started = now()

    sup_opts =
      [
        job: job,
        worker: Keyword.update(opts[:worker] || [], :subscribers, [self()], &[self() | &1])
      ] ++
        Keyword.take(opts, [:max_restarts, :max_seconds, :backoff])

    summary = %{
      job_id: nil,
      run_dir: nil,
      strategy: strategy,
      attempts: [],
      final_step: nil,
      final_loss: nil,
      eval_loss: nil,
      losses: [],
      injected_at: nil,
      recovery_ms: nil,
      elapsed_ms: 0,
      killed_at_ms: nil
    }

    try do
      case JobSupervisor.start_link(sup_opts) do
        {:ok, sup} ->
          deadline = if opts[:timeout], do: started + opts[:timeout], else: :infinity
          result = loop(sup, summary, opts, deadline)
          stop_supervisor(sup)
          flush_events()
          finish(result, started)

        {:error, reason} ->
          finish({:error, {{:start_failed, reason}, summary}}, started)
      end
    after
      Process.flag(:trap_exit, trap)
    end
  end

  defp finish({tag, %{} = s}, started),
    do: {tag, s |> Map.delete(:killed_at_ms) |> Map.put(:elapsed_ms, now() - started)}

  defp finish({tag, {reason, s}}, started),
    do: {tag, {reason, s |> Map.delete(:killed_at_ms) |> Map.put(:elapsed_ms, now() - started)}}

  defp stop_supervisor(sup) do
    if Process.alive?(sup), do: Supervisor.stop(sup, :normal, :infinity)
    # Drain the supervisor's exit so it does not linger in the caller's mailbox.
    receive do
      {:EXIT, ^sup, _} -> :ok
    after
      0 -> :ok
    end
  catch
    :exit, _ -> :ok
  end

  # The stopped worker's last events (worker_down) must not leak into a later cycle.
  defp flush_events do
    receive do
      {:uff_port, _w, _event} -> flush_events()
    after
      0 -> :ok
    end
  end

  defp loop(sup, s, opts, deadline) do
    timeout = if deadline == :infinity, do: :infinity, else: max(0, deadline - now())
    owner = opts[:owner]

    receive do
      # The process that asked for this job is gone (a campaign killed): stop the job
      # the orderly way (checkpoint, exit) so whoever restarts it resumes from there.
      {:EXIT, ^owner, reason} when is_pid(owner) ->
        {:error, {{:owner_down, reason}, s}}

      {:uff_port, _w, %{"event" => name} = event} ->
        if cb = opts[:on_event], do: cb.(current_attempt(s), event)

        case on_event(name, event, s, opts) do
          {:cont, s} -> loop(sup, s, opts, deadline)
          {:done, result} -> result
        end

      {:EXIT, ^sup, reason} ->
        {:error, {{:supervisor_gave_up, reason}, s}}
    after
      timeout -> {:error, {:timeout, s}}
    end
  end

  defp on_event("hello", ev, s, _opts) do
    attempt = %{
      attempt: ev["attempt"],
      os_pid: ev["pid"],
      resumed_from: nil,
      first_step: nil,
      last_step: nil,
      down: nil
    }

    {:cont, %{s | attempts: s.attempts ++ [attempt]}}
  end

  defp on_event("job_started", ev, s, _opts) do
    result = ev["result"] || %{}
    s = update_attempt(s, &%{&1 | resumed_from: result["resumed_from"]})
    {:cont, %{s | job_id: result["job_id"], run_dir: result["run_dir"]}}
  end

  defp on_event("progress", %{"step" => step} = ev, s, opts) when is_integer(step) do
    s = update_attempt(s, fn a -> %{a | first_step: a.first_step || step, last_step: step} end)
    loss = ev["loss"]

    s =
      if is_number(loss),
        do: %{s | losses: [{current_attempt(s), step, loss} | s.losses]},
        else: s

    s =
      if s.killed_at_ms && is_nil(s.recovery_ms) && current_attempt(s) > 1,
        do: %{s | recovery_ms: now() - s.killed_at_ms},
        else: s

    {:cont, maybe_inject(s, step, opts[:inject_crash_at])}
  end

  defp on_event("worker_down", ev, s, _opts) do
    s = update_attempt(s, &%{&1 | down: ev["reason"]})

    case ev["reason"] do
      {:shutdown, {:train_refused, err}} -> {:done, {:error, {{:train_refused, err}, s}}}
      {:shutdown, {:job_failed, info}} -> {:done, {:error, {{:job_failed, info}, s}}}
      _ -> {:cont, s}
    end
  end

  defp on_event("finished", ev, s, _opts) do
    {:done,
     {:ok,
      %{
        s
        | final_step: ev["step"],
          final_loss: ev["loss"],
          eval_loss: ev["eval_loss"],
          losses: Enum.reverse(s.losses),
          job_id: s.job_id || ev["job_id"]
      }}}
  end

  defp on_event(_name, _ev, s, _opts), do: {:cont, s}

  defp maybe_inject(s, step, at) when is_integer(at) and is_nil(s.injected_at) and step >= at do
    case List.last(s.attempts) do
      %{attempt: 1, os_pid: pid} when is_integer(pid) ->
        # SIGKILL: no checkpoint, no goodbye from the worker itself; the supervisor must recover.
        OsProcess.signal(pid, :kill)
        %{s | injected_at: step, killed_at_ms: now()}

      _ ->
        s
    end
  end

  defp maybe_inject(s, _step, _at), do: s

  defp current_attempt(%{attempts: []}), do: 0
  defp current_attempt(%{attempts: a}), do: List.last(a).attempt

  defp update_attempt(%{attempts: []} = s, _fun), do: s
  defp update_attempt(%{attempts: a} = s, fun), do: %{s | attempts: List.update_at(a, -1, fun)}

  defp now, do: System.monotonic_time(:millisecond)
end
