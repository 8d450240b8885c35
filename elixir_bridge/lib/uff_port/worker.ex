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

  ## Events

  Subscribers receive `{:uff_port, worker, event}` where `worker` is the
  registered name (stable across restarts) or the pid, and `event` is the
  worker's event map (`"hello"`, `"heartbeat"`, `"progress"`, `"checkpoint"`,
  `"finished"`, `"failed"`, ...). The bridge adds two of its own, without `"seq"`:
  `%{"event" => "job_started", "attempt" => n, "os_pid" => p, "result" => reply}`
  and `%{"event" => "worker_down", "attempt" => n, "reason" => term, "stderr" => lines}`.

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

  ## Options

    * `:name` - registered name.
    * `:python` - interpreter with uff-port installed (default `$UFF_PORT_PYTHON`,
      else `python3` on `PATH`).
    * `:worker_args` - extra arguments after `serve` (default `[]`).
    * `:command` - `{executable, args}` run instead of `python -m uff_port serve ...`
      (a wrapper such as a container runner; tests use it for fake workers).
    * `:heartbeat_interval` - seconds, passed to the worker (default #{2.0}).
    * `:runs_root`, `:max_frame_bytes`, `:grace_seconds` - passed to the worker when set.
    * `:cd` - working directory of the worker (default: current directory).
    * `:env` - extra environment `[{name, value}]`.
    * `:cuda_visible_devices` - string; default: the VM's own value, if any.
    * `:start_timeout` - ms to wait for `hello` (default 30_000).
    * `:call_timeout` - default per-call deadline in ms (default 30_000); the long
      commands (`checkpoint`, `stop`, `shutdown`, `resume`) use `:long_call_timeout`
      (default 300_000).
    * `:heartbeat_timeout` - ms without a heartbeat before the worker is killed
      (default 10_000; keep it several heartbeat intervals).
    * `:stall_timeout` - ms without the step advancing while training (default 600_000:
      loading a 6.7B model takes minutes).
    * `:shutdown_grace`, `:term_grace` - ms allowed for the `shutdown` command and
      for SIGTERM during teardown (defaults 120_000 and 30_000).
    * `:stderr_log` - file the worker's stderr is appended to (default: a file
      in the system temp dir, per registered name or else per start, removed
      after a `:normal` stop and kept after a crash); `:stderr_lines` kept for
      crash reports (default 40).
    * `:subscribers` - pids or registered names that receive events.
    * `:job` - `train` args to send after every start.
  """

  use GenServer
  require Logger

  alias UffPort.{Error, Msgpack, OsProcess, WorkerState}

  @long_commands ~w(checkpoint stop shutdown resume)
  # How long a worker whose pipe closed gets to finish exiting (and writing stderr).
  @port_closed_grace 2_000

  @type worker :: GenServer.server()
  @type result :: {:ok, map} | {:error, Error.t()}

  # ------------------------------------------------------------------ API

  @doc "Starts the worker and waits for its `hello`; raises `ArgumentError` on bad options."
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts) do
    config = WorkerState.config!(opts)
    GenServer.start_link(__MODULE__, config, if(config.name, do: [name: config.name], else: []))
  end

  @doc """
  Child spec: `:transient` (a crash restarts it, `shutdown` or exit 0 does not),
  and a shutdown allowance that covers the whole teardown escalation.
  """
  def child_spec(opts) do
    config = WorkerState.config!(opts)

    %{
      id: Keyword.get(opts, :id, config.name || __MODULE__),
      start: {__MODULE__, :start_link, [opts]},
      restart: :transient,
      shutdown: config.shutdown_grace + config.term_grace + 5_000
    }
  end

  @doc "Round trip; `{:ok, %{\"pong\" => true, ...}}`. Errors: `:response_timeout`, `:worker_down`."
  @spec ping(worker, keyword) :: result
  def ping(worker, opts \\ []), do: request(worker, "ping", %{}, opts)

  @doc "The worker's status map (`state`, `job_id`, `step`, `loss`, ...)."
  @spec status(worker, keyword) :: result
  def status(worker, opts \\ []), do: request(worker, "status", %{}, opts)

  @doc """
  Starts a job: args `config` (map) or `config_path`, optional `run_dir`, `overrides`.
  Replies when accepted: `{:ok, %{"job_id", "run_dir", "resumed_from"}}`.
  Errors: `:busy`, `:invalid_config`, `:invalid_args`, plus the transport ones.
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
  overrides the worker's default deadline. Never raises or exits: a dead worker
  is `{:error, %Error{code: :worker_down}}`.
  """
  @spec request(worker, String.t(), map, keyword) :: result
  def request(worker, cmd, args \\ %{}, opts \\ []) when is_binary(cmd) and is_map(args) do
    # The server enforces the deadline and always replies; :infinity here avoids a
    # second, racing timer. If the server dies first, the call exits and we return an error.
    GenServer.call(worker, {:request, cmd, args, Keyword.get(opts, :timeout)}, :infinity)
  catch
    :exit, reason -> {:error, Error.new(:worker_down, "worker is not running", reason)}
  end

  @doc "Sends this worker's events to `pid` (until the worker restarts; use `:subscribers` to survive restarts)."
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
  def init(config) do
    # Trap exits so terminate/2 runs on supervisor shutdown: it is what stops the OS process cleanly.
    Process.flag(:trap_exit, true)
    state = WorkerState.new(config)
    attempt = WorkerState.begin_attempt(state)

    case WorkerState.open(%{state | attempt: attempt}) do
      {:ok, state} ->
        notify(state, Map.put(state.hello, "attempt", attempt))
        state = state |> schedule_watchdog() |> send_job()
        {:ok, state}

      {:error, %Error{} = err} ->
        WorkerState.drop_temp_log(state, {:start_failed, err})
        # An error for start_link and a failed restart for a supervisor, so restart
        # intensity (and the ledger's backoff) applies to a worker that cannot start.
        {:stop, {:start_failed, err}}
    end
  end

  @impl true
  def handle_call({:request, cmd, args, timeout}, from, state) do
    timeout =
      timeout || if(cmd in @long_commands, do: state.long_call_timeout, else: state.call_timeout)

    case send_request(state, cmd, args, {:call, from}, timeout) do
      {:ok, state} -> {:noreply, state}
      {:error, err} -> {:reply, {:error, err}, state}
    end
  end

  def handle_call({:subscribe, pid}, _from, state) do
    {:reply, :ok, %{state | subscribers: Enum.uniq([pid | state.subscribers])}}
  end

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
    {:stop, WorkerState.exit_reason(status, state), state}
  end

  def handle_info({:EXIT, port, reason}, %{port: port} = state) do
    # The port closed without an :exit_status: a write met the pipe of a process that
    # had already exited (EPIPE), and no status will follow. Make sure the process is
    # gone (a live one that merely closed stdin is killed), then report a crash with
    # its stderr, so the crash report still says why it died.
    if OsProcess.wait_gone(state.os_pid, @port_closed_grace) == :timeout, do: kill(state)
    state = %{state | port: nil}
    {:stop, WorkerState.port_closed_reason(reason, state), state}
  end

  def handle_info({:EXIT, _other, _reason}, state), do: {:noreply, state}

  def handle_info({:call_timeout, id}, state) do
    case Map.pop(state.pending, id) do
      {nil, _} ->
        {:noreply, state}

      {%{cmd: cmd, from: from, timeout: t}, pending} ->
        err =
          Error.new(:response_timeout, "no reply to #{cmd} within #{t} ms", %{
            cmd: cmd,
            timeout: t
          })

        reply_to(from, {:error, err}, state)
        {:stop, {:call_timeout, cmd}, %{state | pending: pending}}
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
        kill_tree(state)
        {:stop, reason, state}

      {:kill, reason} ->
        # A frozen worker answers nothing, not even SIGTERM: SIGKILL it now. Its trainer
        # gets SIGTERM from the parent-death signal and saves a checkpoint on its own.
        kill(state)
        {:stop, reason, state}
    end
  end

  def handle_info(msg, state) do
    Logger.debug("uff_port worker ignoring #{inspect(msg, limit: 10)}")
    {:noreply, state}
  end

  @impl true
  def terminate(reason, state) do
    for {_id, %{from: from, cmd: cmd}} <- state.pending do
      reply_to(
        from,
        {:error, Error.new(:worker_down, "worker stopped before replying to #{cmd}", reason)},
        state
      )
    end

    status = WorkerState.teardown(state, reason)
    stderr = WorkerState.stderr_tail(state)

    unless reason in [:normal, :shutdown] or match?({:shutdown, _}, reason) do
      Logger.error(
        "uff_port worker #{inspect(state.name || self())} (os pid #{state.os_pid}) stopped: " <>
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

    WorkerState.drop_temp_log(state, reason)
  end

  # ------------------------------------------------------------------ internals

  defp send_request(state, cmd, args, from, timeout) do
    id = state.next_id
    frame = %{"id" => id, "cmd" => cmd, "args" => args}

    case Msgpack.encode(frame) do
      {:ok, bin} ->
        send_frame(state.port, bin)
        timer = Process.send_after(self(), {:call_timeout, id}, timeout)
        entry = %{from: from, cmd: cmd, timer: timer, timeout: timeout}
        {:ok, %{state | next_id: id + 1, pending: Map.put(state.pending, id, entry)}}

      {:error, reason} ->
        {:error, Error.new(:unencodable, "args of #{cmd} cannot be encoded", reason)}
    end
  end

  defp send_frame(port, bin) do
    Port.command(port, bin)
  rescue
    # The process already exited: its :exit_status (or :EXIT) is on the way and
    # stops us; the request's deadline covers the caller meanwhile.
    ArgumentError -> :ok
  end

  defp handle_reply(%{"id" => id, "ok" => ok} = reply, state) do
    case Map.pop(state.pending, id) do
      {nil, _} ->
        # id nil: the worker could not read a request of ours; nothing waits on it.
        Logger.warning(
          "uff_port worker: reply with no pending request: #{inspect(reply, limit: 10)}"
        )

        {:noreply, state}

      {%{from: from, timer: timer}, pending} ->
        Process.cancel_timer(timer)
        state = %{state | pending: pending}

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

  defp send_job(%{job: nil} = state), do: state

  defp send_job(state) do
    case send_request(state, "train", state.job, :job, state.start_timeout) do
      {:ok, state} -> state
      {:error, err} -> raise ArgumentError, "the :job cannot be encoded: #{inspect(err.details)}"
    end
  end

  defp handle_event(name, event, state) do
    state = WorkerState.on_event(state, name, event, now())
    notify(state, event)

    case {name, state.job} do
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

  defp reply_to({:call, from}, result, _state), do: GenServer.reply(from, result)
  defp reply_to(:job, _result, _state), do: :ok

  defp notify(state, event) do
    me = state.name || self()

    for sub <- state.subscribers do
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
    Process.send_after(self(), :watchdog, state.watchdog_every)
    state
  end

  defp kill(%{os_pid: pid}) when is_integer(pid), do: OsProcess.signal(pid, :kill)
  defp kill(_), do: :ok

  defp kill_tree(%{os_pid: pid} = state) when is_integer(pid) do
    for child <- Enum.reverse(OsProcess.descendants(pid)), do: OsProcess.signal(child, :kill)
    kill(state)
  end

  defp now, do: System.monotonic_time(:millisecond)
end
