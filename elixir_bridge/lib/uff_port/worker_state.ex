defmodule UffPort.WorkerState do
  @moduledoc """
  The state of `UffPort.Worker` and everything it does that is not message
  dispatch: option checking, opening the Port and the `hello` handshake,
  watchdog arithmetic, exit-status mapping, the teardown escalation and the
  stderr tail (the backoff lives in `UffPort.RestartLedger`). Kept apart so
  the GenServer reads as a list of message clauses.

  ## Why stderr goes to a file

  A Port captures only stdout (which carries frames and nothing else). The
  worker is started as `/bin/sh -c 'exec "$@" 2>>LOG'`: the shell `exec`s, so
  the Port's OS pid *is* the Python worker (signals reach it directly), and
  stderr is appended to `LOG`, whose tail goes into crash reports. A file, not
  a second pipe: it survives the worker, costs nothing while nobody reads it,
  and can never fill up and block the worker the way an unread pipe would.
  """

  alias UffPort.{Error, Msgpack, OsProcess, RestartLedger}

  @sh_exec ~S(log="$1"; shift; exec "$@" 2>>"$log")
  @stderr_tail_bytes 32_768

  @defaults [
    name: nil,
    python: nil,
    command: nil,
    worker_args: [],
    heartbeat_interval: 2.0,
    runs_root: nil,
    max_frame_bytes: nil,
    grace_seconds: nil,
    cd: nil,
    env: [],
    cuda_visible_devices: nil,
    start_timeout: 30_000,
    call_timeout: 30_000,
    long_call_timeout: 300_000,
    heartbeat_timeout: 10_000,
    stall_timeout: 600_000,
    shutdown_grace: 120_000,
    term_grace: 30_000,
    stderr_log: nil,
    stderr_lines: 40,
    subscribers: [],
    job: nil,
    ledger: nil,
    backoff: [base: 500, max: 15_000, healthy_after: 30_000]
  ]

  defstruct Keyword.keys(@defaults) ++
              [
                :argv,
                :watchdog_every,
                :port,
                :os_pid,
                :hello,
                :exit_status,
                :job_id,
                :step,
                :max_steps,
                :loss,
                :last_heartbeat_at,
                :step_changed_at,
                :phase,
                attempt: 1,
                next_id: 1,
                pending: %{},
                stderr_offset: 0,
                worker_state: "starting",
                training?: false,
                healthy?: false,
                temp_log?: false
              ]

  @type t :: %__MODULE__{}

  @doc "Checks options and fills defaults; raises `ArgumentError` naming the bad option."
  @spec config!(keyword) :: t
  def config!(opts) when is_list(opts) do
    opts = Keyword.delete(opts, :id)

    case Keyword.keys(opts) -- Keyword.keys(@defaults) do
      [] ->
        :ok

      bad ->
        raise ArgumentError,
              "unknown UffPort.Worker options #{inspect(bad)}; known: #{inspect(Keyword.keys(@defaults))}"
    end

    c = struct!(__MODULE__, Keyword.merge(@defaults, opts))

    for key <- [
          :start_timeout,
          :call_timeout,
          :long_call_timeout,
          :heartbeat_timeout,
          :stall_timeout,
          :shutdown_grace,
          :term_grace,
          :stderr_lines
        ] do
      v = Map.fetch!(c, key)

      unless is_integer(v) and v > 0,
        do: raise(ArgumentError, "#{key} must be a positive integer (ms), got #{inspect(v)}")
    end

    unless is_number(c.heartbeat_interval) and c.heartbeat_interval > 0,
      do:
        raise(
          ArgumentError,
          "heartbeat_interval must be a positive number of seconds, got #{inspect(c.heartbeat_interval)}"
        )

    unless is_nil(c.job) or is_map(c.job),
      do: raise(ArgumentError, "job must be a map of train args, got #{inspect(c.job)}")

    unless is_list(c.subscribers),
      do: raise(ArgumentError, "subscribers must be a list of pids or names")

    {python, argv} =
      case c.command do
        nil ->
          {resolve_python(c.python), argv(c)}

        {exe, args} when is_binary(exe) and is_list(args) ->
          {exe, Enum.map(args, &to_string/1)}

        other ->
          raise ArgumentError, "command must be {executable, [args]}, got #{inspect(other)}"
      end

    %{
      c
      | python: python,
        argv: argv,
        cd: Path.expand(c.cd || File.cwd!()),
        stderr_log: Path.expand(c.stderr_log || default_log(c.name)),
        temp_log?: c.stderr_log == nil,
        backoff: Keyword.merge(@defaults[:backoff], c.backoff),
        watchdog_every: max(50, div(min(c.heartbeat_timeout, c.stall_timeout), 5))
    }
  end

  defp resolve_python(nil), do: resolve_python(System.get_env("UFF_PORT_PYTHON") || "python3")

  defp resolve_python(python) when is_binary(python) do
    cond do
      String.contains?(python, "/") and File.regular?(python) ->
        Path.expand(python)

      found = System.find_executable(python) ->
        found

      true ->
        raise ArgumentError, "python #{inspect(python)} not found; set :python or UFF_PORT_PYTHON"
    end
  end

  defp argv(c) do
    hb = :erlang.float_to_binary(c.heartbeat_interval * 1.0, [:compact, decimals: 3])

    ["-m", "uff_port", "serve", "--heartbeat-interval", hb] ++
      opt_arg("--runs-root", c.runs_root && Path.expand(c.runs_root)) ++
      opt_arg("--max-frame-bytes", c.max_frame_bytes) ++
      opt_arg("--grace-seconds", c.grace_seconds) ++ Enum.map(c.worker_args, &to_string/1)
  end

  defp opt_arg(_flag, nil), do: []
  defp opt_arg(flag, value), do: [flag, to_string(value)]

  defp default_log(name) do
    tag =
      if name,
        do: inspect(name) |> String.replace(~r/[^A-Za-z0-9_.-]/, "_"),
        else: "os#{System.pid()}-#{System.unique_integer([:positive])}"

    Path.join(System.tmp_dir!(), "uff_port-#{tag}.stderr.log")
  end

  @doc "A fresh runtime state from a checked config."
  @spec new(t) :: t
  def new(%__MODULE__{} = config), do: config

  # ------------------------------------------------------------------ start

  @doc "Records this start in the restart ledger (sleeping its backoff); the attempt number."
  @spec begin_attempt(t) :: pos_integer
  def begin_attempt(%{ledger: nil}), do: 1
  def begin_attempt(%{ledger: ledger, backoff: b}), do: RestartLedger.begin_attempt(ledger, b)

  @doc "Notes once per start that training advanced, so the next restart needs no backoff."
  @spec mark_healthy(t) :: t
  def mark_healthy(%{healthy?: true} = state), do: state
  def mark_healthy(%{ledger: nil} = state), do: %{state | healthy?: true}

  def mark_healthy(%{ledger: ledger} = state) do
    RestartLedger.mark_healthy(ledger)
    %{state | healthy?: true}
  end

  @doc "Opens the Port and waits for `hello`; on failure nothing is left running."
  @spec open(t) :: {:ok, t} | {:error, Error.t()}
  def open(state) do
    File.mkdir_p!(Path.dirname(state.stderr_log))

    offset =
      case File.stat(state.stderr_log),
        do:
          (
            {:ok, %{size: s}} -> s
            _ -> 0
          )

    port =
      Port.open({:spawn_executable, "/bin/sh"}, [
        :binary,
        :exit_status,
        :use_stdio,
        :hide,
        {:packet, 4},
        {:args, ["-c", @sh_exec, "uff-port-worker", state.stderr_log, state.python | state.argv]},
        {:env, env(state)},
        {:cd, state.cd}
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    handshake(%{state | port: port, os_pid: os_pid, stderr_offset: offset})
  end

  defp env(state) do
    cuda = state.cuda_visible_devices || System.get_env("CUDA_VISIBLE_DEVICES")

    base = [
      {"PYTHONUNBUFFERED", "1"},
      # A segfault in a C extension still leaves a Python traceback in the stderr log.
      {"PYTHONFAULTHANDLER", "1"},
      {"CUDA_VISIBLE_DEVICES", cuda}
    ]

    for {k, v} <- base ++ state.env, into: [] do
      {String.to_charlist(to_string(k)),
       if(v == nil, do: false, else: String.to_charlist(to_string(v)))}
    end
  end

  defp handshake(%{port: port} = state) do
    receive do
      {^port, {:data, data}} ->
        case Msgpack.decode(data) do
          {:ok, %{"event" => "hello", "protocol" => 1} = hello} ->
            # Prefer the worker's own pid: a python that is a wrapper script would not exec.
            pid = if is_integer(hello["pid"]), do: hello["pid"], else: state.os_pid
            now = System.monotonic_time(:millisecond)

            {:ok,
             %{
               state
               | hello: hello,
                 os_pid: pid,
                 worker_state: "idle",
                 last_heartbeat_at: now,
                 step_changed_at: now
             }}

          other ->
            abandon(state)
            {:error, Error.new(:bad_hello, "first frame was not a protocol-1 hello", other)}
        end

      {^port, {:exit_status, status}} ->
        state = %{state | port: nil, exit_status: status}

        {:error,
         Error.new(:start_failed, "worker exited with status #{status} before hello", %{
           status: status,
           stderr: stderr_tail(state)
         })}
    after
      state.start_timeout ->
        abandon(state)

        {:error,
         Error.new(:start_timeout, "no hello within #{state.start_timeout} ms", %{
           stderr: stderr_tail(state)
         })}
    end
  end

  defp abandon(state) do
    OsProcess.signal(state.os_pid, :kill)
    wait_exit(state.port, 5_000)
    close(state.port)
  end

  # ------------------------------------------------------------------ events and watchdogs

  @doc "Folds one worker event into the state (liveness, step, loss, training or not)."
  @spec on_event(t, String.t(), map, integer) :: t
  def on_event(state, name, event, now) do
    state = if name == "heartbeat", do: %{state | last_heartbeat_at: now}, else: state

    state =
      case event["state"] do
        s when is_binary(s) and name in ["heartbeat", "state"] ->
          # The trainer's phase (loading, training, evaluating, saving) rides on state
          # events only; heartbeats keep the last one.
          phase = if name == "state", do: event["phase"], else: state.phase
          # Only the trainer's stepping phase can stall. Before it reports a phase the
          # trainer is still starting (importing torch, DeepSpeed: seconds on a busy
          # machine), and loading a model or evaluating is slow: none is a stall.
          training? = s == "training" and phase == "training"
          # Entering the stepping phase restarts the stall clock.
          changed_at = if training? and not state.training?, do: now, else: state.step_changed_at

          %{
            state
            | worker_state: s,
              phase: phase,
              training?: training?,
              step_changed_at: changed_at
          }

        _ ->
          state
      end

    state =
      case event["step"] do
        step when is_integer(step) and step != state.step ->
          state = %{state | step: step, step_changed_at: now}
          # Healthy only once this start has taken a step: a resumed trainer's `state`
          # event already carries the resume step, and a crash right after it must
          # still be backed off.
          if name == "progress" and state.training? and step > 0,
            do: mark_healthy(state),
            else: state

        _ ->
          state
      end

    state = if is_binary(event["job_id"]), do: %{state | job_id: event["job_id"]}, else: state

    state =
      if is_integer(event["max_steps"]), do: %{state | max_steps: event["max_steps"]}, else: state

    state = if name == "progress", do: %{state | loss: event["loss"]}, else: state
    if name in ["finished", "failed"], do: %{state | training?: false}, else: state
  end

  @doc """
  The `train` of the carried job was accepted. The stall clock starts once the
  trainer reports its stepping phase (`on_event/4`), not here: it is only starting.
  """
  @spec job_accepted(t, integer) :: t
  def job_accepted(state, now), do: %{state | step_changed_at: now}

  @doc "`:ok`, or `{:kill, reason}` when heartbeats stopped or the step stopped moving."
  @spec watchdog(t, integer) :: :ok | {:kill, term}
  def watchdog(state, now) do
    silent = now - state.last_heartbeat_at
    stalled = now - state.step_changed_at

    cond do
      silent > state.heartbeat_timeout ->
        {:kill,
         {:heartbeat_timeout,
          %{
            silent_ms: silent,
            timeout_ms: state.heartbeat_timeout,
            os_pid: state.os_pid,
            step: state.step
          }}}

      state.training? and stalled > state.stall_timeout ->
        {:kill,
         {:stalled,
          %{
            step: state.step,
            stalled_ms: stalled,
            timeout_ms: state.stall_timeout,
            os_pid: state.os_pid
          }}}

      true ->
        :ok
    end
  end

  # ------------------------------------------------------------------ exit and teardown

  @doc "Exit status -> stop reason (0 normal, 75 resumable, anything else a crash)."
  @spec exit_reason(non_neg_integer, t) :: term
  def exit_reason(0, _state), do: :normal
  def exit_reason(75, _state), do: {:shutdown, :resumable}

  def exit_reason(status, state) do
    signal = if status > 128, do: status - 128

    {:worker_crashed,
     %{status: status, signal: signal, os_pid: state.os_pid, stderr: stderr_tail(state)}}
  end

  @doc """
  Removes the default stderr log (one the caller did not choose) after a
  normal stop, or when it is empty: nothing in it is needed, and the temp dir
  would fill up. A crashed worker's log with something in it stays for the
  post-mortem.
  """
  @spec drop_temp_log(t, term) :: :ok
  def drop_temp_log(%{temp_log?: true, stderr_log: log}, reason) do
    if reason == :normal or match?({:ok, %{size: 0}}, File.stat(log)), do: _ = File.rm(log)
    :ok
  end

  def drop_temp_log(_state, _reason), do: :ok

  @doc """
  The stop reason when the Port closed without an exit status (`reason` is the
  Port's, e.g. `:epipe`): a crash with an unknown status, and the stderr tail.
  """
  @spec port_closed_reason(term, t) :: {:worker_crashed, map}
  def port_closed_reason(reason, state) do
    {:worker_crashed,
     %{
       status: nil,
       signal: nil,
       port_closed: reason,
       os_pid: state.os_pid,
       stderr: stderr_tail(state)
     }}
  end

  @doc """
  Makes sure the OS process is gone and returns its exit status (nil if unknown).
  Escalates `shutdown` (checkpoint, exit 0) -> SIGTERM (checkpoint, exit 75) ->
  SIGKILL. A frozen worker (watchdog) goes straight to SIGKILL; one that sent a
  bad frame cannot be spoken to, so it starts at SIGTERM.
  """
  @spec teardown(t, term) :: non_neg_integer | nil
  def teardown(%{port: nil} = state, _reason), do: state.exit_status

  def teardown(state, reason) do
    steps =
      case reason do
        {tag, _} when tag in [:heartbeat_timeout, :stalled] -> [:sigkill]
        {:bad_frame, _} -> [:sigterm, :sigkill]
        _ -> [:shutdown, :sigterm, :sigkill]
      end

    status = Enum.find_value(steps, fn step -> escalate(step, state) end)
    close(state.port)
    status
  end

  defp escalate(:shutdown, state) do
    frame = Msgpack.encode!(%{"id" => state.next_id, "cmd" => "shutdown", "args" => %{}})

    try do
      Port.command(state.port, frame)
      wait_exit(state.port, state.shutdown_grace)
    rescue
      ArgumentError -> nil
    end
  end

  defp escalate(:sigterm, state) do
    OsProcess.signal(state.os_pid, :term)
    wait_exit(state.port, state.term_grace)
  end

  defp escalate(:sigkill, state) do
    OsProcess.signal(state.os_pid, :kill)
    wait_exit(state.port, 10_000)
  end

  defp wait_exit(port, timeout) do
    receive do
      {^port, {:exit_status, status}} -> status
    after
      timeout -> nil
    end
  end

  defp close(port) do
    Port.close(port)
  rescue
    ArgumentError -> :ok
  end

  # ------------------------------------------------------------------ views

  @doc "The last `stderr_lines` lines the worker wrote to stderr since this start."
  @spec stderr_tail(t) :: [String.t()]
  def stderr_tail(state) do
    with {:ok, %{size: size}} <- File.stat(state.stderr_log),
         from = max(state.stderr_offset, size - @stderr_tail_bytes),
         {:ok, fd} <- File.open(state.stderr_log, [:read, :binary]) do
      data =
        case :file.pread(fd, from, size - from) do
          {:ok, d} -> d
          _ -> ""
        end

      File.close(fd)
      data |> String.split("\n", trim: true) |> Enum.take(-state.stderr_lines)
    else
      _ -> []
    end
  end

  @doc "The bridge's view of the worker."
  @spec snapshot(t) :: map
  def snapshot(state) do
    Map.take(state, [
      :os_pid,
      :attempt,
      :worker_state,
      :phase,
      :job_id,
      :step,
      :max_steps,
      :loss,
      :hello,
      :training?,
      :stderr_log
    ])
  end
end
