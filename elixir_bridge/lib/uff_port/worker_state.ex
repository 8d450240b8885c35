defmodule UffPort.WorkerState do
  @moduledoc """
  What `UffPort.Worker` knows about its worker, and every decision it takes
  from that knowledge, as pure functions: no process, no clock, no file. Time
  comes in as `now` (monotonic ms), OS facts (monitor references, timers, the
  stderr tail) as arguments, so each rule is unit-tested on a bare struct
  (`test/worker_state_test.exs`).

      state = UffPort.WorkerState.new(UffPort.WorkerOptions.new!(command: {"/bin/true", []}))
      state = UffPort.WorkerState.started(state, %{"event" => "hello", "protocol" => 1}, 0)
      UffPort.WorkerState.watchdog(state, 20_000)
      #=> {:kill, {:heartbeat_timeout, %{silent_ms: 20_000, ...}}}

  It holds:

    * liveness and progress for the watchdogs (`on_event/4`, `watchdog/2`);
    * the requests in flight, by id (`reserve_id/1`, `put_pending/3`,
      `pop_pending/2`, `take_pending/1`) and their deadlines (`deadline/2`);
    * the subscribers and their monitors (`add_subscriber/3`, `drop_subscriber/2`);
    * the mapping from how the worker ended to a stop reason (`exit_reason/3`,
      `port_closed_reason/3`) and to a teardown (`teardown_steps/1`).

  The Port itself is opened, spoken to and closed by `UffPort.WorkerPort`.
  """

  alias UffPort.WorkerOptions

  # The bridge's own default goes to the other commands; these wait on a checkpoint.
  @long_commands ~w(checkpoint stop shutdown resume)
  # The longest timer the VM can set (ms): a deadline from the wire is held to it.
  @max_deadline 4_294_967_295

  @typedoc "Who waits for a reply: a caller, or the carried job's `train` (nobody waits)."
  @type waiter :: {:call, GenServer.from()} | :job
  @type pending :: %{
          from: waiter,
          cmd: String.t(),
          timer: reference,
          timeout: pos_integer
        }
  @type teardown_step :: :shutdown | :sigterm | :sigkill

  @enforce_keys [:opts]
  defstruct [
    :opts,
    :port,
    :os_pid,
    :hello,
    :exit_status,
    :job_id,
    :step,
    :max_steps,
    :loss,
    :phase,
    last_heartbeat_at: 0,
    step_changed_at: 0,
    attempt: 1,
    next_id: 1,
    pending: %{},
    subscribers: %{},
    deadlines: %{},
    stderr_offset: 0,
    worker_state: "starting",
    training?: false,
    healthy?: false
  ]

  @type t :: %__MODULE__{
          opts: WorkerOptions.t(),
          port: port | nil,
          os_pid: pos_integer | nil,
          hello: map | nil,
          exit_status: non_neg_integer | nil,
          job_id: String.t() | nil,
          step: integer | nil,
          max_steps: integer | nil,
          loss: number | atom | nil,
          phase: String.t() | nil,
          last_heartbeat_at: integer,
          step_changed_at: integer,
          attempt: pos_integer,
          next_id: pos_integer,
          pending: %{pos_integer => pending},
          subscribers: %{WorkerOptions.subscriber() => reference | nil},
          deadlines: %{String.t() => pos_integer},
          stderr_offset: non_neg_integer,
          worker_state: String.t(),
          training?: boolean,
          healthy?: boolean
        }

  @doc "A state for a worker not yet started."
  @spec new(WorkerOptions.t(), pos_integer) :: t
  def new(%WorkerOptions{} = opts, attempt \\ 1), do: %__MODULE__{opts: opts, attempt: attempt}

  # ------------------------------------------------------------------ start

  @doc """
  The Port is open (`port`, `os_pid`; `offset` is where this start's stderr
  begins in the log).
  """
  @spec opened(t, port, pos_integer, non_neg_integer) :: t
  def opened(state, port, os_pid, offset),
    do: %{state | port: port, os_pid: os_pid, stderr_offset: offset}

  @doc """
  `hello` arrived at `now`: the worker is idle, the watchdog clocks start, and
  the per-command deadlines it announces (`command_info`) are noted.
  """
  @spec started(t, map, integer) :: t
  def started(state, hello, now) do
    # Prefer the worker's own pid: a python that is a wrapper script would not exec.
    os_pid = if is_integer(hello["pid"]), do: hello["pid"], else: state.os_pid

    %{
      state
      | hello: hello,
        os_pid: os_pid,
        deadlines: announced_deadlines(hello["command_info"]),
        worker_state: "idle",
        last_heartbeat_at: now,
        step_changed_at: now
    }
  end

  # command_info is wire data: anything but a positive number of seconds is no deadline.
  defp announced_deadlines(info) when is_map(info) do
    for {cmd, %{"deadline_s" => s}} when is_binary(cmd) and is_number(s) and s > 0 <- info,
        into: %{},
        do: {cmd, min(ceil(s * 1000), @max_deadline)}
  end

  defp announced_deadlines(_), do: %{}

  # ------------------------------------------------------------------ requests

  @doc """
  The deadline in ms for `cmd`: the bridge's default (`:long_call_timeout` for
  the commands that wait on a checkpoint, else `:call_timeout`), or the
  worker's `deadline_s` for it when that is longer. A worker that may take a
  grace period to answer `train` (it waits for an orphaned trainer's final
  checkpoint) must not be killed for it: its restart would wait the same way.
  """
  @spec deadline(t, String.t()) :: pos_integer
  def deadline(%{opts: opts} = state, cmd) do
    default = if cmd in @long_commands, do: opts.long_call_timeout, else: opts.call_timeout
    max(default, Map.get(state.deadlines, cmd, 0))
  end

  @doc "The deadline of the carried job's `train`: at least `:start_timeout`."
  @spec job_deadline(t) :: pos_integer
  def job_deadline(state),
    do: max(state.opts.start_timeout, Map.get(state.deadlines, "train", 0))

  @doc "The id for the next request."
  @spec reserve_id(t) :: {pos_integer, t}
  def reserve_id(%{next_id: id} = state), do: {id, %{state | next_id: id + 1}}

  @doc "Notes a request in flight under `id`."
  @spec put_pending(t, pos_integer, pending) :: t
  def put_pending(state, id, entry), do: %{state | pending: Map.put(state.pending, id, entry)}

  @doc "Takes the request `id` out of flight: `{entry, state}`, or `{nil, state}` if unknown."
  @spec pop_pending(t, term) :: {pending | nil, t}
  def pop_pending(state, id) do
    {entry, pending} = Map.pop(state.pending, id)
    {entry, %{state | pending: pending}}
  end

  @doc "Every request still in flight, oldest first, and a state with none."
  @spec take_pending(t) :: {[pending], t}
  def take_pending(state) do
    entries = state.pending |> Enum.sort() |> Enum.map(&elem(&1, 1))
    {entries, %{state | pending: %{}}}
  end

  # ------------------------------------------------------------------ subscribers

  @doc """
  Adds a subscriber: a pid with its monitor `ref`, or a registered name with
  `nil` (a name is looked up at each event, so it survives its process'
  restarts).
  """
  @spec add_subscriber(t, WorkerOptions.subscriber(), reference | nil) :: t
  def add_subscriber(state, sub, ref),
    do: %{state | subscribers: Map.put(state.subscribers, sub, ref)}

  @doc "True when `sub` already receives events."
  @spec subscribed?(t, WorkerOptions.subscriber()) :: boolean
  def subscribed?(state, sub), do: Map.has_key?(state.subscribers, sub)

  @doc "Drops the subscriber whose monitor `ref` fired (the process died)."
  @spec drop_subscriber(t, reference) :: t
  def drop_subscriber(state, ref) do
    %{state | subscribers: Map.reject(state.subscribers, fn {_sub, r} -> r == ref end)}
  end

  @doc "The subscribers, pids and names."
  @spec subscribers(t) :: [WorkerOptions.subscriber()]
  def subscribers(state), do: Map.keys(state.subscribers)

  # ------------------------------------------------------------------ events and watchdogs

  @doc """
  Folds one worker event into the state (liveness, step, loss, training or
  not). The state becomes `healthy?` at this start's first own training step;
  the caller records that in the restart ledger.
  """
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
            do: %{state | healthy?: true},
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
  @spec watchdog(t, integer) ::
          :ok | {:kill, {:heartbeat_timeout, map} | {:stalled, map}}
  def watchdog(%{opts: opts} = state, now) do
    silent = now - state.last_heartbeat_at
    stalled = now - state.step_changed_at

    cond do
      silent > opts.heartbeat_timeout ->
        {:kill,
         {:heartbeat_timeout,
          %{
            silent_ms: silent,
            timeout_ms: opts.heartbeat_timeout,
            os_pid: state.os_pid,
            step: state.step
          }}}

      state.training? and stalled > opts.stall_timeout ->
        {:kill,
         {:stalled,
          %{
            step: state.step,
            stalled_ms: stalled,
            timeout_ms: opts.stall_timeout,
            os_pid: state.os_pid
          }}}

      true ->
        :ok
    end
  end

  # ------------------------------------------------------------------ exit

  @doc """
  Exit status -> stop reason. 0: `:normal`. 75: `{:shutdown, :resumable}` (the
  worker stopped a job early with a durable checkpoint because someone sent
  SIGTERM: a `:transient` child is not restarted against that wish). Anything
  else: `{:worker_crashed, %{status, signal, os_pid, stderr}}`, `signal` set
  for a status above 128.
  """
  @spec exit_reason(t, non_neg_integer, [String.t()]) ::
          :normal | {:shutdown, :resumable} | {:worker_crashed, map}
  def exit_reason(_state, 0, _stderr), do: :normal
  def exit_reason(_state, 75, _stderr), do: {:shutdown, :resumable}

  def exit_reason(state, status, stderr) do
    signal = if status > 128, do: status - 128

    {:worker_crashed, %{status: status, signal: signal, os_pid: state.os_pid, stderr: stderr}}
  end

  @doc """
  The stop reason when the Port closed without an exit status (`reason` is the
  Port's, e.g. `:epipe`): a crash with an unknown status, and the stderr tail.
  """
  @spec port_closed_reason(t, term, [String.t()]) :: {:worker_crashed, map}
  def port_closed_reason(state, reason, stderr) do
    {:worker_crashed,
     %{status: nil, signal: nil, port_closed: reason, os_pid: state.os_pid, stderr: stderr}}
  end

  @doc """
  How to end a worker that is still running, given why: `shutdown` (checkpoint,
  exit 0) -> SIGTERM (checkpoint, exit 75) -> SIGKILL. A frozen worker
  (watchdog) answers nothing, not even SIGTERM: straight to SIGKILL. One that
  sent a bad frame cannot be spoken to: it starts at SIGTERM.
  """
  @spec teardown_steps(term) :: [teardown_step]
  def teardown_steps({tag, _}) when tag in [:heartbeat_timeout, :stalled], do: [:sigkill]
  def teardown_steps({:bad_frame, _}), do: [:sigterm, :sigkill]
  def teardown_steps(_reason), do: [:shutdown, :sigterm, :sigkill]

  @doc "True for the stop reasons that are not failures (nothing to log as an error)."
  @spec clean_stop?(term) :: boolean
  def clean_stop?(reason),
    do: reason in [:normal, :shutdown] or match?({:shutdown, _}, reason)

  # ------------------------------------------------------------------ views

  @doc "The bridge's view of the worker."
  @spec snapshot(t) :: map
  def snapshot(state) do
    state
    |> Map.take([
      :os_pid,
      :attempt,
      :worker_state,
      :phase,
      :job_id,
      :step,
      :max_steps,
      :loss,
      :hello,
      :training?
    ])
    |> Map.put(:stderr_log, state.opts.stderr_log)
  end
end
