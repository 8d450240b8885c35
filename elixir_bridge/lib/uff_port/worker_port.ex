defmodule UffPort.WorkerPort do
  @moduledoc """
  The OS side of `UffPort.Worker`: opening the Port and the `hello` handshake,
  writing frames, signals, the teardown escalation and the stderr log. Every
  function here runs in the Worker's process (it owns the Port) and may block
  on a `receive` from the Port; the decisions (which teardown, which stop
  reason) are `UffPort.WorkerState`'s.

  ## Why stderr goes to a file

  A Port captures only stdout (which carries frames and nothing else). The
  worker is started as `/bin/sh -c 'exec "$@" 2>>LOG'`: the shell `exec`s, so
  the Port's OS pid *is* the Python worker (signals reach it directly), and
  stderr is appended to `LOG`, whose tail goes into crash reports. A file, not
  a second pipe: it survives the worker, costs nothing while nobody reads it,
  and can never fill up and block the worker the way an unread pipe would.
  """

  alias UffPort.{Error, Msgpack, OsProcess, WorkerOptions, WorkerState}

  @sh_exec ~S(log="$1"; shift; exec "$@" 2>>"$log")
  @stderr_tail_bytes 32_768
  # How long a process that is being abandoned, or was sent SIGKILL, gets to be reaped.
  @abandon_wait 5_000
  @kill_wait 10_000

  @doc """
  Opens the Port and waits up to `:start_timeout` for `hello` (protocol 1).
  On failure nothing is left running. Errors: `:start_failed` (exited before
  `hello`, with its status and stderr tail), `:start_timeout`, `:bad_hello`.
  """
  @spec open(WorkerState.t(), integer) :: {:ok, WorkerState.t()} | {:error, Error.t()}
  def open(%WorkerState{opts: opts} = state, now) do
    File.mkdir_p!(Path.dirname(opts.stderr_log))

    # This start's stderr begins at the log's current end (a named worker's log is shared by its restarts).
    offset =
      case File.stat(opts.stderr_log) do
        {:ok, %{size: size}} -> size
        _ -> 0
      end

    port =
      Port.open({:spawn_executable, "/bin/sh"}, [
        :binary,
        :exit_status,
        :use_stdio,
        :hide,
        {:packet, 4},
        {:args, ["-c", @sh_exec, "uff-port-worker", opts.stderr_log, opts.python | opts.argv]},
        {:env, env(opts)},
        {:cd, opts.cd}
      ])

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    handshake(WorkerState.opened(state, port, os_pid, offset), now)
  end

  defp env(opts) do
    cuda = opts.cuda_visible_devices || System.get_env("CUDA_VISIBLE_DEVICES")

    base = [
      {"PYTHONUNBUFFERED", "1"},
      # A segfault in a C extension still leaves a Python traceback in the stderr log.
      {"PYTHONFAULTHANDLER", "1"},
      {"CUDA_VISIBLE_DEVICES", cuda}
    ]

    for {k, v} <- base ++ opts.env do
      {String.to_charlist(to_string(k)),
       if(v == nil, do: false, else: String.to_charlist(to_string(v)))}
    end
  end

  defp handshake(%{port: port, opts: opts} = state, now) do
    receive do
      {^port, {:data, data}} ->
        case Msgpack.decode(data) do
          {:ok, %{"event" => "hello", "protocol" => 1} = hello} ->
            {:ok, WorkerState.started(state, hello, now)}

          other ->
            abandon(state)
            {:error, Error.new(:bad_hello, "first frame was not a protocol-1 hello", other)}
        end

      {^port, {:exit_status, status}} ->
        {:error,
         Error.new(:start_failed, "worker exited with status #{status} before hello", %{
           status: status,
           stderr: stderr_tail(state)
         })}
    after
      opts.start_timeout ->
        abandon(state)

        {:error,
         Error.new(:start_timeout, "no hello within #{opts.start_timeout} ms", %{
           stderr: stderr_tail(state)
         })}
    end
  end

  defp abandon(state) do
    OsProcess.signal(state.os_pid, :kill)
    wait_exit(state.port, @abandon_wait)
    close(state.port)
  end

  @doc """
  Writes one encoded frame. A worker that already exited is not an error here:
  its `:exit_status` (or the Port's `:EXIT`) is on the way and stops the
  Worker, and the request's deadline covers the caller meanwhile.
  """
  @spec send_frame(port, iodata) :: :ok
  def send_frame(port, bin) do
    Port.command(port, bin)
    :ok
  rescue
    ArgumentError -> :ok
  end

  @doc "SIGKILL to the worker process (when its pid is known)."
  @spec kill(WorkerState.t()) :: :ok
  def kill(%{os_pid: pid}) when is_integer(pid) do
    _ = OsProcess.signal(pid, :kill)
    :ok
  end

  def kill(_state), do: :ok

  @doc """
  SIGKILL to the worker's descendants (deepest first), then to the worker: a
  hung trainer ignores SIGTERM and would outlive its worker, and it can be
  found (through `/proc`) only while it is still the worker's child.
  """
  @spec kill_tree(WorkerState.t()) :: :ok
  def kill_tree(%{os_pid: pid} = state) when is_integer(pid) do
    for child <- Enum.reverse(OsProcess.descendants(pid)), do: OsProcess.signal(child, :kill)
    kill(state)
  end

  def kill_tree(_state), do: :ok

  @doc "Waits up to `grace` ms for the worker process to be gone, then SIGKILLs it."
  @spec ensure_gone(WorkerState.t(), non_neg_integer) :: :ok
  def ensure_gone(%{os_pid: pid} = state, grace) when is_integer(pid) do
    if OsProcess.wait_gone(pid, grace) == :timeout, do: kill(state)
    :ok
  end

  def ensure_gone(_state, _grace), do: :ok

  @doc """
  Makes sure the OS process is gone and returns its exit status (nil if
  unknown), walking the steps of `WorkerState.teardown_steps/1`, each waiting
  for the exit status up to `:shutdown_grace` / `:term_grace` / 10 s.
  """
  @spec teardown(WorkerState.t(), term) :: non_neg_integer | nil
  def teardown(%{port: nil} = state, _reason), do: state.exit_status

  def teardown(state, reason) do
    status =
      Enum.find_value(WorkerState.teardown_steps(reason), fn step -> escalate(step, state) end)

    close(state.port)
    status
  end

  defp escalate(:shutdown, state) do
    frame = Msgpack.encode!(%{"id" => state.next_id, "cmd" => "shutdown", "args" => %{}})

    try do
      Port.command(state.port, frame)
      wait_exit(state.port, state.opts.shutdown_grace)
    rescue
      ArgumentError -> nil
    end
  end

  defp escalate(:sigterm, state) do
    OsProcess.signal(state.os_pid, :term)
    wait_exit(state.port, state.opts.term_grace)
  end

  defp escalate(:sigkill, state) do
    OsProcess.signal(state.os_pid, :kill)
    wait_exit(state.port, @kill_wait)
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

  # ------------------------------------------------------------------ stderr log

  @doc "The last `:stderr_lines` lines the worker wrote to stderr since this start."
  @spec stderr_tail(WorkerState.t()) :: [String.t()]
  def stderr_tail(%{opts: opts, stderr_offset: offset}) do
    with {:ok, %{size: size}} <- File.stat(opts.stderr_log),
         from = max(offset, size - @stderr_tail_bytes),
         {:ok, fd} <- File.open(opts.stderr_log, [:read, :binary]) do
      data =
        case :file.pread(fd, from, size - from) do
          {:ok, d} -> d
          _ -> ""
        end

      File.close(fd)
      data |> String.split("\n", trim: true) |> Enum.take(-opts.stderr_lines)
    else
      _ -> []
    end
  end

  @doc """
  Removes the default stderr log (one the caller did not choose) after a
  normal stop, or when it is empty: nothing in it is needed, and the temp dir
  would fill up. A crashed worker's log with something in it stays for the
  post-mortem.
  """
  @spec drop_temp_log(WorkerOptions.t(), term) :: :ok
  def drop_temp_log(%WorkerOptions{temp_log?: true, stderr_log: log}, reason) do
    if reason == :normal or match?({:ok, %{size: 0}}, File.stat(log)), do: _ = File.rm(log)
    :ok
  end

  def drop_temp_log(_opts, _reason), do: :ok
end
