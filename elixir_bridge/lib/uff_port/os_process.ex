defmodule UffPort.OsProcess do
  @moduledoc """
  Signals and liveness of OS processes by pid. A Port can only close its pipes;
  a frozen (SIGSTOP) or hung worker must be killed by pid.
  """

  @type signal :: :term | :kill | :stop | :cont | :int

  @doc "Sends `signal` to `os_pid`; `:ok` or `{:error, output}` (e.g. no such process)."
  @spec signal(pos_integer, signal) :: :ok | {:error, String.t()}
  def signal(os_pid, signal) when is_integer(os_pid) and os_pid > 1 do
    name = signal |> Atom.to_string() |> String.upcase()

    case System.cmd("kill", ["-s", name, Integer.to_string(os_pid)], stderr_to_stdout: true) do
      {_, 0} -> :ok
      {out, _} -> {:error, String.trim(out)}
    end
  end

  @doc """
  True while the process exists and is not a zombie. A zombie counts as gone:
  in containers whose pid 1 does not reap, an exited orphan stays a zombie forever.
  """
  @spec alive?(pos_integer) :: boolean
  def alive?(os_pid) when is_integer(os_pid) do
    case File.read("/proc/#{os_pid}/stat") do
      {:ok, stat} ->
        # "pid (comm) S ...": the state letter follows the last ')', comm may hold spaces.
        {at, 1} = stat |> :binary.matches(")") |> List.last()
        state = stat |> binary_part(at + 1, byte_size(stat) - at - 1) |> String.trim_leading()
        not String.starts_with?(state, ["Z", "X"])

      {:error, :enoent} ->
        false

      {:error, _} ->
        match?(
          {_, 0},
          System.cmd("kill", ["-0", Integer.to_string(os_pid)], stderr_to_stdout: true)
        )
    end
  end

  @doc """
  All descendants of `os_pid` (children first), read from `/proc`; `[]` where
  there is no `/proc`. The trainer runs in its own session, so it is not in the
  worker's process group: this is how a hung trainer is found and killed too.
  """
  @spec descendants(pos_integer) :: [pos_integer]
  def descendants(os_pid) do
    parents =
      case File.ls("/proc") do
        {:ok, names} ->
          for name <- names, pid = parse_pid(name), ppid = ppid(pid), do: {pid, ppid}

        {:error, _} ->
          []
      end

    collect([os_pid], Enum.group_by(parents, &elem(&1, 1), &elem(&1, 0)), [])
  end

  defp collect([], _children, acc), do: Enum.reverse(acc)

  defp collect([pid | rest], children, acc) do
    kids = Map.get(children, pid, [])
    collect(rest ++ kids, children, Enum.reverse(kids) ++ acc)
  end

  defp parse_pid(name) do
    case Integer.parse(name) do
      {pid, ""} -> pid
      _ -> nil
    end
  end

  defp ppid(pid) do
    with {:ok, stat} <- File.read("/proc/#{pid}/stat"),
         {at, 1} <- stat |> :binary.matches(")") |> List.last(),
         [_state, ppid | _] <-
           stat |> binary_part(at + 2, byte_size(stat) - at - 2) |> String.split(" ", parts: 3) do
      String.to_integer(ppid)
    else
      _ -> nil
    end
  end

  @doc "Polls `alive?/1` until the process is gone or `timeout_ms` passes."
  @spec wait_gone(pos_integer, non_neg_integer) :: :ok | :timeout
  def wait_gone(os_pid, timeout_ms) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    do_wait_gone(os_pid, deadline)
  end

  defp do_wait_gone(os_pid, deadline) do
    cond do
      not alive?(os_pid) ->
        :ok

      System.monotonic_time(:millisecond) >= deadline ->
        :timeout

      true ->
        Process.sleep(20)
        do_wait_gone(os_pid, deadline)
    end
  end
end
