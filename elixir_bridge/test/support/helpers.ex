defmodule UffPort.Test.Helpers do
  @moduledoc "Shared bits of the bridge's tests."

  import ExUnit.Assertions

  @fake Path.expand("fake_worker.py", __DIR__)

  @doc "The interpreter with uff-port installed (set by test_helper.exs)."
  def python, do: System.get_env("UFF_PORT_PYTHON") || "python3"

  @doc "Worker options running the fake worker in `mode` (with `args`)."
  def fake(mode, args \\ []),
    do: [command: {python(), [@fake, mode | Enum.map(args, &to_string/1)]}]

  @doc "Options every real-worker test uses: fast heartbeats, a private runs root and log."
  def worker_opts(tmp, extra \\ []) do
    Keyword.merge(
      [
        heartbeat_interval: 0.2,
        heartbeat_timeout: 5_000,
        runs_root: Path.join(tmp, "runs"),
        stderr_log: Path.join(tmp, "worker.stderr.log"),
        cd: tmp,
        shutdown_grace: 20_000,
        term_grace: 5_000
      ],
      extra
    )
  end

  @doc "Waits for a matching `{:uff_port, _, event}` message; returns the event."
  defmacro await_event(pattern, timeout \\ 10_000) do
    quote do
      receive do
        {:uff_port, _w, unquote(pattern) = ev} -> ev
      after
        unquote(timeout) ->
          flunk(
            "no event matching #{unquote(Macro.to_string(pattern))} in #{unquote(timeout)} ms"
          )
      end
    end
  end

  @doc """
  Worker `:env` under which the Python `module` cannot be imported (installed or
  not): a shim that raises ImportError goes first on PYTHONPATH, for the worker
  and everything it starts.
  """
  def without_python_module(tmp, module) do
    shim = Path.join(tmp, "shim-#{module}")
    File.mkdir_p!(shim)

    File.write!(
      Path.join(shim, "#{module}.py"),
      "raise ImportError('#{module} is not installed here')\n"
    )

    path = Enum.join(Enum.reject([shim, System.get_env("PYTHONPATH")], &(&1 in [nil, ""])), ":")
    [{"PYTHONPATH", path}, {"UFF_PORT_CLOUD_FAKE", nil}]
  end

  @doc "True once the OS process is gone (zombies count as gone)."
  def gone?(os_pid, timeout \\ 10_000), do: UffPort.OsProcess.wait_gone(os_pid, timeout) == :ok

  @doc "A fresh private directory: unique within this VM and across VMs running at once."
  def tmp_dir!(name) do
    unique = "#{System.pid()}_#{System.unique_integer([:positive])}"
    dir = Path.join(System.tmp_dir!(), "uff_port_test_#{name}_#{unique}")

    File.rm_rf!(dir)
    File.mkdir_p!(dir)
    dir
  end
end
