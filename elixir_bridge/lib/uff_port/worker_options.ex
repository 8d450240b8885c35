defmodule UffPort.WorkerOptions do
  alias UffPort.RestartLedger

  # The defaults; the documentation below is written from them.
  @heartbeat_interval 2.0
  @start_timeout 30_000
  @call_timeout 30_000
  @long_call_timeout 300_000
  @heartbeat_timeout 10_000
  @stall_timeout 600_000
  @shutdown_grace 120_000
  @term_grace 30_000
  @stderr_lines 40
  @backoff [base: 500, max: 15_000, healthy_after: 30_000]
  # The watchdog runs this many times per (shortest) timeout, and never more often than every 50 ms.
  @watchdog_checks 5
  @watchdog_min_every 50

  @moduledoc """
  The options of `UffPort.Worker`, checked once at start: `new!/1` fills the
  defaults and raises `ArgumentError` naming the first bad option, so a typo
  fails in `start_link/1` (or in the child spec), never later in a callback.

      opts = UffPort.WorkerOptions.new!(python: ".venv/bin/python", runs_root: "runs")
      opts.call_timeout   #=> #{@call_timeout}

  ## Options

    * `:name` - registered name (an atom, `{:global, term}` or `{:via, module, term}`).
    * `:python` - interpreter with uff-port installed (default `$UFF_PORT_PYTHON`,
      else `python3` on `PATH`).
    * `:worker_args` - extra arguments after `serve` (default `[]`).
    * `:command` - `{executable, args}` run instead of `python -m uff_port serve ...`
      (a wrapper such as a container runner; tests use it for fake workers).
    * `:heartbeat_interval` - seconds, passed to the worker (default #{@heartbeat_interval}).
    * `:runs_root`, `:max_frame_bytes`, `:grace_seconds` - passed to the worker
      (`--runs-root`, `--max-frame-bytes`, `--grace-seconds`) when set.
    * `:cd` - working directory of the worker (default: the current directory).
    * `:env` - extra environment `[{name, value}]`; a nil value unsets the variable.
    * `:cuda_visible_devices` - string (`"0,1"`); default: the VM's own value, if any.
    * `:start_timeout` - ms to wait for `hello` (default #{@start_timeout}); also
      the least the carried `:job`'s `train` is given.
    * `:call_timeout` - the bridge's default per-call deadline in ms (default
      #{@call_timeout}); `checkpoint`, `stop`, `shutdown` and `resume` use
      `:long_call_timeout` (default #{@long_call_timeout}). A command whose
      `deadline_s` in the worker's `hello` is longer gets that instead (see
      "Deadlines" in `UffPort.Worker`); `timeout:` on a call overrides both.
    * `:heartbeat_timeout` - ms without a heartbeat before the worker is killed
      (default #{@heartbeat_timeout}; keep it several heartbeat intervals).
    * `:stall_timeout` - ms without the step advancing while training (default
      #{@stall_timeout}: loading a 6.7B model takes minutes).
    * `:shutdown_grace`, `:term_grace` - ms allowed for the `shutdown` command and
      for SIGTERM during teardown (defaults #{@shutdown_grace} and #{@term_grace}).
    * `:stderr_log` - file the worker's stderr is appended to (default: a file
      in the system temp dir, per registered name or else per start, removed
      after a `:normal` stop and kept after a crash).
    * `:stderr_lines` - stderr lines kept for crash reports (default #{@stderr_lines}).
    * `:subscribers` - pids or registered names that receive events; a pid is
      monitored and dropped when it dies, a name is looked up at each event.
    * `:job` - `train` args (a map) to send after every start.
    * `:ledger`, `:backoff` - the restart ledger and its backoff
      (`#{inspect(@backoff)}`, ms); set by `UffPort.JobSupervisor`.
  """

  @defaults [
    name: nil,
    python: nil,
    command: nil,
    worker_args: [],
    heartbeat_interval: @heartbeat_interval,
    runs_root: nil,
    max_frame_bytes: nil,
    grace_seconds: nil,
    cd: nil,
    env: [],
    cuda_visible_devices: nil,
    start_timeout: @start_timeout,
    call_timeout: @call_timeout,
    long_call_timeout: @long_call_timeout,
    heartbeat_timeout: @heartbeat_timeout,
    stall_timeout: @stall_timeout,
    shutdown_grace: @shutdown_grace,
    term_grace: @term_grace,
    stderr_log: nil,
    stderr_lines: @stderr_lines,
    subscribers: [],
    job: nil,
    ledger: nil,
    backoff: @backoff
  ]

  @positive_ms [
    :start_timeout,
    :call_timeout,
    :long_call_timeout,
    :heartbeat_timeout,
    :stall_timeout,
    :shutdown_grace,
    :term_grace
  ]

  # Derived by new!/1: the executable's arguments, whether the stderr log is ours to
  # remove, and the watchdog period.
  defstruct Keyword.keys(@defaults) ++ [argv: [], temp_log?: false, watchdog_every: 0]

  @type subscriber :: pid | atom
  @type t :: %__MODULE__{
          name: GenServer.name() | nil,
          python: String.t(),
          command: {String.t(), [String.t()]} | nil,
          worker_args: [String.t()],
          heartbeat_interval: number,
          runs_root: String.t() | nil,
          max_frame_bytes: pos_integer | nil,
          grace_seconds: number | nil,
          cd: String.t(),
          env: [{String.t() | atom, String.t() | nil}],
          cuda_visible_devices: String.t() | non_neg_integer | nil,
          start_timeout: pos_integer,
          call_timeout: pos_integer,
          long_call_timeout: pos_integer,
          heartbeat_timeout: pos_integer,
          stall_timeout: pos_integer,
          shutdown_grace: pos_integer,
          term_grace: pos_integer,
          stderr_log: String.t(),
          stderr_lines: pos_integer,
          subscribers: [subscriber],
          job: map | nil,
          ledger: RestartLedger.t() | nil,
          backoff: keyword(pos_integer),
          argv: [String.t()],
          temp_log?: boolean,
          watchdog_every: pos_integer
        }

  @doc "The option names `new!/1` accepts (`:id`, a child spec's, is ignored)."
  @spec keys() :: [atom]
  def keys, do: Keyword.keys(@defaults)

  @doc """
  Checks `opts` and fills the defaults. Raises `ArgumentError` naming the
  option: an unknown one, a value of the wrong kind, or a `:python` that
  cannot be found.
  """
  @spec new!(keyword) :: t
  def new!(opts) when is_list(opts) do
    opts = Keyword.delete(opts, :id)

    case Keyword.keys(opts) -- keys() do
      [] ->
        :ok

      bad ->
        raise ArgumentError,
              "unknown UffPort.Worker options #{inspect(bad)}; known: #{inspect(keys())}"
    end

    o = struct!(__MODULE__, Keyword.merge(@defaults, opts))
    Enum.each(@positive_ms, &check!(&1, Map.fetch!(o, &1), :positive_ms))
    check!(:stderr_lines, o.stderr_lines, :positive_integer)
    check!(:heartbeat_interval, o.heartbeat_interval, :positive_number)
    check!(:grace_seconds, o.grace_seconds, {:or_nil, :positive_number})
    check!(:max_frame_bytes, o.max_frame_bytes, {:or_nil, :positive_integer})
    check!(:name, o.name, {:or_nil, :name})
    check!(:python, o.python, {:or_nil, :string})
    check!(:runs_root, o.runs_root, {:or_nil, :string})
    check!(:cd, o.cd, {:or_nil, :string})
    check!(:stderr_log, o.stderr_log, {:or_nil, :string})
    check!(:cuda_visible_devices, o.cuda_visible_devices, {:or_nil, :devices})
    check!(:worker_args, o.worker_args, :list)
    check!(:env, o.env, :env)
    check!(:subscribers, o.subscribers, :subscribers)
    check!(:job, o.job, {:or_nil, :map})
    check!(:backoff, o.backoff, :backoff)

    {python, argv} =
      case o.command do
        nil ->
          {resolve_python(o.python), argv(o)}

        {exe, args} when is_binary(exe) and is_list(args) ->
          {exe, Enum.map(args, &to_string/1)}

        other ->
          raise ArgumentError, "command must be {executable, [args]}, got #{inspect(other)}"
      end

    %{
      o
      | python: python,
        argv: argv,
        cd: Path.expand(o.cd || File.cwd!()),
        stderr_log: Path.expand(o.stderr_log || default_log(o.name)),
        temp_log?: o.stderr_log == nil,
        backoff: Keyword.merge(@backoff, o.backoff),
        watchdog_every:
          max(
            @watchdog_min_every,
            div(min(o.heartbeat_timeout, o.stall_timeout), @watchdog_checks)
          )
    }
  end

  defp check!(key, value, kind) do
    unless valid?(value, kind) do
      raise ArgumentError, "#{key} must be #{describe(kind)}, got #{inspect(value)}"
    end
  end

  defp valid?(nil, {:or_nil, _}), do: true
  defp valid?(v, {:or_nil, kind}), do: valid?(v, kind)
  defp valid?(v, :positive_ms), do: is_integer(v) and v > 0
  defp valid?(v, :positive_integer), do: is_integer(v) and v > 0
  defp valid?(v, :positive_number), do: is_number(v) and v > 0
  defp valid?(v, :string), do: is_binary(v)
  defp valid?(v, :list), do: is_list(v)
  defp valid?(v, :devices), do: is_binary(v) or (is_integer(v) and v >= 0)
  defp valid?(v, :map), do: is_map(v)
  defp valid?(v, :name), do: is_atom(v) or match?({:global, _}, v) or match?({:via, _, _}, v)

  defp valid?(v, :env),
    do: is_list(v) and Enum.all?(v, &match?({k, _} when is_binary(k) or is_atom(k), &1))

  defp valid?(v, :subscribers), do: is_list(v) and Enum.all?(v, &(is_pid(&1) or is_atom(&1)))

  defp valid?(v, :backoff),
    do: Keyword.keyword?(v) and Enum.all?(v, fn {_k, ms} -> is_integer(ms) and ms > 0 end)

  defp describe({:or_nil, kind}), do: "#{describe(kind)} or nil"
  defp describe(:positive_ms), do: "a positive integer (ms)"
  defp describe(:positive_integer), do: "a positive integer"
  defp describe(:positive_number), do: "a positive number (seconds)"
  defp describe(:string), do: "a string"
  defp describe(:list), do: "a list"
  defp describe(:devices), do: "a string such as \"0,1\" (or one device index)"
  defp describe(:map), do: "a map of train args"
  defp describe(:name), do: "a registered name (atom, {:global, _} or {:via, _, _})"
  defp describe(:env), do: "a list of {name, value} pairs"
  defp describe(:subscribers), do: "a list of pids or names"
  defp describe(:backoff), do: "a keyword list of positive integers (ms)"

  defp resolve_python(nil), do: resolve_python(System.get_env("UFF_PORT_PYTHON") || "python3")

  defp resolve_python(python) do
    cond do
      String.contains?(python, "/") and File.regular?(python) ->
        Path.expand(python)

      found = System.find_executable(python) ->
        found

      true ->
        raise ArgumentError, "python #{inspect(python)} not found; set :python or UFF_PORT_PYTHON"
    end
  end

  defp argv(o) do
    hb = :erlang.float_to_binary(o.heartbeat_interval * 1.0, [:compact, decimals: 3])

    ["-m", "uff_port", "serve", "--heartbeat-interval", hb] ++
      opt_arg("--runs-root", o.runs_root && Path.expand(o.runs_root)) ++
      opt_arg("--max-frame-bytes", o.max_frame_bytes) ++
      opt_arg("--grace-seconds", o.grace_seconds) ++ Enum.map(o.worker_args, &to_string/1)
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
end
