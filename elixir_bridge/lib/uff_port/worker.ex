defmodule UffPort.Worker do
  @moduledoc """
  One GenServer owns one `uff-port serve` OS process through a `{packet, 4}` Port.

      {:ok, w} = UffPort.Worker.start_link(heartbeat_interval: 0.5)
      {:ok, %{"pong" => true}} = UffPort.Worker.ping(w)
      :ok = UffPort.Worker.subscribe(w)
      {:ok, %{"job_id" => id}} = UffPort.Worker.train(w, %{"config_path" => "tiny"})
      receive do
        {:uff_port, ^w, %{"event" => "finished"} = ev} -> ev
      end

  Requests carry an id and the caller's `from` waits in `pending`; replies are
  sent from `handle_info`, so the GenServer never blocks on Python. Every call
  has a deadline; a call that misses it gets `{:error, %UffPort.Error{code:
  :response_timeout}}` and the worker is torn down (shutdown -> SIGTERM ->
  SIGKILL) and this process exits, so a supervisor restarts it fresh: a worker
  in an unknown state is never kept.

  With `:job` set (see `UffPort.JobSupervisor`) the worker sends that `train`
  as soon as `hello` arrives, on every start: after a crash the Python side
  resumes from the run directory's last durable checkpoint.

  This module is the API and the message clauses. What the bridge knows and
  decides is `UffPort.WorkerState` (pure functions on a struct), the OS side
  (the Port, signals, teardown, the stderr log) is `UffPort.WorkerPort`, and
  the options are `UffPort.WorkerOptions`.

  ## Events

  Subscribers receive `{:uff_port, worker, event}` where `worker` is the
  registered name (stable across restarts) or the pid, and `event` is the
  worker's event map (`"hello"`, `"heartbeat"`, `"progress"`, `"checkpoint"`,
  `"finished"`, `"failed"`, ...). The bridge adds two of its own, without `"seq"`:
  `%{"event" => "job_started", "attempt" => n, "os_pid" => p, "result" => reply}`
  and `%{"event" => "worker_down", "attempt" => n, "reason" => term, "stderr" => lines}`.
  A subscribed pid is monitored and dropped when it dies; a registered name is
  looked up at each event (so it survives its own restarts).

  ## Stop reasons

    * exit status 0 -> `:normal`; 75 -> `{:shutdown, :resumable}` (the worker
      stopped a job early with a durable checkpoint, e.g. it was sent SIGTERM:
      someone wants it down, so a `:transient` child is not restarted);
    * any other status -> `{:worker_crashed, %{status:, signal:, stderr:}}`;
    * a worker that exited before reading a request the bridge wrote closes the
      Port with EPIPE, and no status arrives: `{:worker_crashed, %{status: nil,
      port_closed: :epipe, stderr:}}`;
    * `{:heartbeat_timeout, info}`, `{:stalled, info}` from the watchdogs;
    * `{:call_timeout, cmd}`, `{:bad_frame, reason}`, `{:shutdown, {:train_refused, error}}`.

  ## Deadlines

  A call's deadline is its `timeout:` option when given; otherwise the
  bridge's default for the command (`:call_timeout`; `:long_call_timeout` for
  `checkpoint`, `stop`, `shutdown`, `resume`), or the `deadline_s` the worker
  announced for it in `hello`'s `command_info` when that is longer. The worker
  announces `train` and `resume` at its grace period plus a margin (130 s by
  default): before replying it may wait that long for a trainer orphaned by a
  dead worker to commit its final checkpoint, and killing it sooner would only
  restart it into the same wait. The carried `:job`'s `train` gets at least
  `:start_timeout`, or the announced deadline when longer.

  ## Options

  Checked at start by `UffPort.WorkerOptions.new!/1` (a bad one raises
  `ArgumentError` naming it), which lists them all with their defaults: the
  worker's command line (`:python`, `:runs_root`, `:heartbeat_interval`, ...),
  the deadlines and watchdog timeouts (`:call_timeout`, `:heartbeat_timeout`,
  `:stall_timeout`, ...), the teardown graces, the stderr log,
  `:subscribers` and the carried `:job`.
  """

  use GenServer
  require Logger

  alias UffPort.{Error, Msgpack, RestartLedger, WorkerOptions, WorkerPort, WorkerState}

  # How long a worker whose pipe closed gets to finish exiting (and writing stderr).
  @port_closed_grace 2_000

  @type worker :: GenServer.server()
  @type result :: {:ok, map} | {:error, Error.t()}

  # ------------------------------------------------------------------ API

  @doc """
  Starts the worker and waits for its `hello`. Raises `ArgumentError` on bad
  options; `{:error, {:start_failed, %Error{}}}` (`:start_failed`,
  `:start_timeout`, `:bad_hello`) when the worker does not come up.
  """
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts) do
    opts = WorkerOptions.new!(opts)
    GenServer.start_link(__MODULE__, opts, if(opts.name, do: [name: opts.name], else: []))
  end

  @doc """
  Child spec: `:transient` (a crash restarts it, `shutdown` or exit 0 does not),
  and a shutdown allowance that covers the whole teardown escalation.
  """
  @spec child_spec(keyword) :: Supervisor.child_spec()
  def child_spec(opts) do
    checked = WorkerOptions.new!(opts)

    %{
      id: Keyword.get(opts, :id, checked.name || __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      restart: :transient,
      shutdown: checked.shutdown_grace + checked.term_grace + 5_000
    }
  end

  @doc "Round trip; `{:ok, %{\"pong\" => true, ...}}`. Errors: `:response_timeout`, `:worker_down`."
  @spec ping(worker, keyword) :: result
  def ping(worker, opts \\ []), do: request(worker, "ping", %{}, opts)

  @doc "The worker's status map (`state`, `job_id`, `step`, `loss`, ...)."
  @spec status(worker, keyword) :: result
  def status(worker, opts \\ []), do: request(worker, "status", %{}, opts)

  @doc """
  Starts a job: args `config` (map) or `config_path`, optional `run_dir`, `overrides`, `fresh`
  (`true`: train from step 0 even over a finished run directory).
  Replies when accepted: `{:ok, %{"job_id", "run_dir", "resumed_from"}}`.
  Errors: `:busy`, `:invalid_config`, `:invalid_args`, `:data_not_found`, `:not_available`
  (no CUDA device), `:wont_fit`, plus the transport ones.
  """
  @spec train(worker, map, keyword) :: result
  def train(worker, args, opts \\ []), do: request(worker, "train", args, opts)

  @doc "Writes a checkpoint; replies once it is durable: `{:ok, %{\"step\", \"path\"}}`. `:no_job` when idle."
  @spec checkpoint(worker, keyword) :: result
  def checkpoint(worker, opts \\ []), do: request(worker, "checkpoint", %{}, opts)

  @doc "Resumes `args[\"run_dir\"]` (optionally from `args[\"checkpoint\"]`)."
  @spec resume(worker, map, keyword) :: result
  def resume(worker, args, opts \\ []), do: request(worker, "resume", args, opts)

  @doc "Stops the job (`%{\"checkpoint\" => false}` to skip the checkpoint); replies once stopped."
  @spec stop(worker, map, keyword) :: result
  def stop(worker, args \\ %{}, opts \\ []), do: request(worker, "stop", args, opts)

  @doc "Stops any job with a checkpoint and makes the worker exit 0; this GenServer then stops `:normal`."
  @spec shutdown(worker, keyword) :: result
  def shutdown(worker, opts \\ []), do: request(worker, "shutdown", %{}, opts)

  @doc """
  Any command, including the worker's extension commands. `opts[:timeout]` (ms)
  overrides the command's deadline (see "Deadlines"). Never raises or exits:
  a dead worker is `{:error, %Error{code: :worker_down}}`; a missed deadline
  `:response_timeout`; args that cannot be encoded `:unencodable`.
  """
  @spec request(worker, String.t(), map, keyword) :: result
  def request(worker, cmd, args \\ %{}, opts \\ []) when is_binary(cmd) and is_map(args) do
    # The server enforces the deadline and always replies; :infinity here avoids a
    # second, racing timer. If the server dies first, the call exits and we return an error.
    GenServer.call(worker, {:request, cmd, args, Keyword.get(opts, :timeout)}, :infinity)
  catch
    :exit, reason -> {:error, Error.new(:worker_down, "worker is not running", reason)}
  end

  @doc """
  Sends this worker's events to `pid` until it dies or the worker restarts
  (use `:subscribers` to survive restarts).
  """
  @spec subscribe(worker, pid | atom) :: :ok
  def subscribe(worker, pid \\ self()), do: GenServer.call(worker, {:subscribe, pid})

  @doc "The bridge's own view (no round trip): os_pid, attempt, state, step, loss, hello."
  @spec snapshot(worker) :: map
  def snapshot(worker), do: GenServer.call(worker, :snapshot)

  @doc "The OS pid of the worker process."
  @spec os_pid(worker) :: pos_integer
  def os_pid(worker), do: snapshot(worker).os_pid

  # ------------------------------------------------------------------ server

  @impl true
  def init(%WorkerOptions{} = opts) do
    # Trap exits so terminate/2 runs on supervisor shutdown: it is what stops the OS process cleanly.
    Process.flag(:trap_exit, true)
    # Sleeps the restart backoff first when the previous start died young.
    attempt = if opts.ledger, do: RestartLedger.begin_attempt(opts.ledger, opts.backoff), else: 1
    state = Enum.reduce(opts.subscribers, WorkerState.new(opts, attempt), &subscribe_to/2)

    case WorkerPort.open(state, now()) do
      {:ok, state} ->
        notify(state, Map.put(state.hello, "attempt", attempt))
        state = state |> schedule_watchdog() |> send_job()
        {:ok, state}

      {:error, %Error{} = err} ->
        WorkerPort.drop_temp_log(opts, {:start_failed, err})
        # An error for start_link and a failed restart for a supervisor, so restart
        # intensity (and the ledger's backoff) applies to a worker that cannot start.
        {:stop, {:start_failed, err}}
    end
  end

  @impl true
  def handle_call({:request, cmd, args, timeout}, from, state) do
    timeout = timeout || WorkerState.deadline(state, cmd)

    case send_request(state, cmd, args, {:call, from}, timeout) do
      {:ok, state} -> {:noreply, state}
      {:error, err} -> {:reply, {:error, err}, state}
    end
  end

  def handle_call({:subscribe, sub}, _from, state), do: {:reply, :ok, subscribe_to(sub, state)}

  def handle_call(:snapshot, _from, state), do: {:reply, WorkerState.snapshot(state), state}

  @impl true
  def handle_info({port, {:data, data}}, %{port: port} = state) do
    case Msgpack.decode(data) do
      {:ok, %{"event" => name} = event} when is_binary(name) ->
        handle_event(name, event, state)

      {:ok, %{"id" => _, "ok" => ok} = reply} when is_boolean(ok) ->
        handle_reply(reply, state)

      {:ok, other} ->
        {:stop, {:bad_frame, {:unexpected_frame, other}}, state}

      {:error, reason} ->
        # The stream can no longer be trusted; only this worker goes, callers get errors.
        {:stop, {:bad_frame, reason}, state}
    end
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    # The OS process is gone: nothing to tear down, and the port closes itself.
    state = %{state | port: nil, exit_status: status}
    {:stop, WorkerState.exit_reason(state, status, WorkerPort.stderr_tail(state)), state}
  end

  def handle_info({:EXIT, port, reason}, %{port: port} = state) do
    # The port closed without an :exit_status: a write met the pipe of a process that
    # had already exited (EPIPE), and no status will follow. Make sure the process is
    # gone (a live one that merely closed stdin is killed), then report a crash with
    # its stderr, so the crash report still says why it died.
    WorkerPort.ensure_gone(state, @port_closed_grace)
    state = %{state | port: nil}
    {:stop, WorkerState.port_closed_reason(state, reason, WorkerPort.stderr_tail(state)), state}
  end

  def handle_info({:EXIT, _other, _reason}, state), do: {:noreply, state}

  def handle_info({:DOWN, ref, :process, _pid, _reason}, state) do
    # A subscriber died: stop sending to it (a reused pid must not get our events).
    {:noreply, WorkerState.drop_subscriber(state, ref)}
  end

  def handle_info({:call_timeout, id}, state) do
    case WorkerState.pop_pending(state, id) do
      {nil, state} ->
        {:noreply, state}

      {%{cmd: cmd, from: from, timeout: t}, state} ->
        err =
          Error.new(:response_timeout, "no reply to #{cmd} within #{t} ms", %{
            cmd: cmd,
            timeout: t
          })

        reply_to(from, {:error, err})
        # A worker that did not answer in time is in an unknown state: tear it down
        # and let the supervisor start a fresh one.
        {:stop, {:call_timeout, cmd}, state}
    end
  end

  def handle_info(:watchdog, state) do
    case WorkerState.watchdog(state, now()) do
      :ok ->
        {:noreply, schedule_watchdog(state)}

      {:kill, {:stalled, _} = reason} ->
        # Heartbeats flow but the step does not: the trainer is hung (a C-level hang
        # ignores SIGTERM, and would outlive its worker). Kill it first, then the worker,
        # while the trainer is still the worker's child and can be found.
        WorkerPort.kill_tree(state)
        {:stop, reason, state}

      {:kill, reason} ->
        # A frozen worker answers nothing, not even SIGTERM: SIGKILL it now. Its trainer
        # gets SIGTERM from the parent-death signal and saves a checkpoint on its own.
        WorkerPort.kill(state)
        {:stop, reason, state}
    end
  end

  def handle_info(msg, state) do
    Logger.debug("uff_port worker ignoring #{inspect(msg, limit: 10)}")
    {:noreply, state}
  end

  @impl true
  def terminate(reason, state) do
    {waiting, state} = WorkerState.take_pending(state)

    for %{from: from, cmd: cmd} <- waiting do
      err = Error.new(:worker_down, "worker stopped before replying to #{cmd}", reason)
      reply_to(from, {:error, err})
    end

    status = WorkerPort.teardown(state, reason)
    stderr = WorkerPort.stderr_tail(state)

    unless WorkerState.clean_stop?(reason) do
      Logger.error(
        "uff_port worker #{inspect(state.opts.name || self())} (os pid #{state.os_pid}) stopped: " <>
          "#{inspect(reason, limit: 20)}\n--- last stderr lines ---\n#{Enum.join(stderr, "\n")}"
      )
    end

    notify(state, %{
      "event" => "worker_down",
      "attempt" => state.attempt,
      "os_pid" => state.os_pid,
      "reason" => reason,
      "exit_status" => status,
      "stderr" => stderr
    })

    WorkerPort.drop_temp_log(state.opts, reason)
  end

  # ------------------------------------------------------------------ internals

  defp send_request(state, cmd, args, from, timeout) do
    {id, next} = WorkerState.reserve_id(state)

    case Msgpack.encode(%{"id" => id, "cmd" => cmd, "args" => args}) do
      {:ok, bin} ->
        WorkerPort.send_frame(state.port, bin)
        timer = Process.send_after(self(), {:call_timeout, id}, timeout)
        entry = %{from: from, cmd: cmd, timer: timer, timeout: timeout}
        {:ok, WorkerState.put_pending(next, id, entry)}

      {:error, reason} ->
        {:error, Error.new(:unencodable, "args of #{cmd} cannot be encoded", reason)}
    end
  end

  defp handle_reply(%{"id" => id, "ok" => ok} = reply, state) do
    case WorkerState.pop_pending(state, id) do
      {nil, state} ->
        # id nil: the worker could not read a request of ours; nothing waits on it.
        Logger.warning(
          "uff_port worker: reply with no pending request: #{inspect(reply, limit: 10)}"
        )

        {:noreply, state}

      {%{from: from, timer: timer}, state} ->
        Process.cancel_timer(timer)

        result =
          if ok,
            do: {:ok, reply["result"] || %{}},
            else: {:error, Error.from_wire(reply["error"])}

        case from do
          {:call, caller} ->
            GenServer.reply(caller, result)
            {:noreply, state}

          :job ->
            job_reply(result, state)
        end
    end
  end

  defp job_reply({:ok, result}, state) do
    state = WorkerState.job_accepted(state, now())

    notify(state, %{
      "event" => "job_started",
      "attempt" => state.attempt,
      "os_pid" => state.os_pid,
      "result" => result
    })

    {:noreply, state}
  end

  defp job_reply({:error, err}, state) do
    # A refused job (bad config) would be refused again after a restart: stop without one.
    {:stop, {:shutdown, {:train_refused, err}}, state}
  end

  defp send_job(%{opts: %{job: nil}} = state), do: state

  defp send_job(%{opts: %{job: job}} = state) do
    case send_request(state, "train", job, :job, WorkerState.job_deadline(state)) do
      {:ok, state} -> state
      {:error, err} -> raise ArgumentError, "the :job cannot be encoded: #{inspect(err.details)}"
    end
  end

  defp handle_event(name, event, state) do
    was_healthy? = state.healthy?
    state = WorkerState.on_event(state, name, event, now())
    # This start took its first training step: the next restart needs no backoff.
    if state.healthy? and not was_healthy? and state.opts.ledger,
      do: RestartLedger.mark_healthy(state.opts.ledger)

    notify(state, event)

    case {name, state.opts.job} do
      {"failed", job} when job != nil ->
        # The carried job died in the trainer (CUDA error, OOM at load, ...). Resumable:
        # crash, so the supervisor restarts us (with backoff) and the job resumes.
        # Not resumable: a restart would fail the same way, so stop for good.
        reason = {:job_failed, Map.take(event, ["code", "message", "resumable", "step"])}

        if event["resumable"] == true,
          do: {:stop, reason, state},
          else: {:stop, {:shutdown, reason}, state}

      _ ->
        {:noreply, state}
    end
  end

  defp subscribe_to(sub, state) do
    cond do
      WorkerState.subscribed?(state, sub) -> state
      is_pid(sub) -> WorkerState.add_subscriber(state, sub, Process.monitor(sub))
      true -> WorkerState.add_subscriber(state, sub, nil)
    end
  end

  defp reply_to({:call, from}, result), do: GenServer.reply(from, result)
  defp reply_to(:job, _result), do: :ok

  defp notify(state, event) do
    me = state.opts.name || self()

    for sub <- WorkerState.subscribers(state) do
      # send/2 to an unregistered name raises; a subscriber that went away is not our crash.
      case sub do
        pid when is_pid(pid) ->
          send(pid, {:uff_port, me, event})

        name when is_atom(name) ->
          if pid = Process.whereis(name), do: send(pid, {:uff_port, me, event})
      end
    end

    :ok
  end

  defp schedule_watchdog(state) do
    Process.send_after(self(), :watchdog, state.opts.watchdog_every)
    state
  end

  defp now, do: System.monotonic_time(:millisecond)
end
