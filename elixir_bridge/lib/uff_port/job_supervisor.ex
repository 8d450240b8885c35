defmodule UffPort.JobSupervisor do
  @moduledoc """
  Supervises one worker that carries one training job.

      {:ok, sup} =
        UffPort.JobSupervisor.start_link(
          job: %{"config_path" => "configs/tiny.yaml", "run_dir" => "tiny-1"},
          worker: [runs_root: "runs", subscribers: [self()]]
        )

  The worker's child spec carries the job: every (re)start sends the same
  `train`, and the Python side resumes from the run directory's last durable
  checkpoint. A crashed worker is restarted (`:transient`); a worker that keeps
  dying soon after start is restarted with exponential backoff (see
  `UffPort.RestartLedger`) until `max_restarts` in `max_seconds`
  is exceeded, when this supervisor gives up and exits too.

  ## Options

    * `:job` (required) - `train` args: `config` or `config_path`, `run_dir`, `overrides`.
    * `:worker` - `UffPort.Worker` options (`:subscribers`, `:runs_root`, timeouts, ...).
    * `:max_restarts` (default 3), `:max_seconds` (default 60) - restart intensity.
    * `:backoff` - `[base: 500, max: 15_000, healthy_after: 30_000]` (ms).
    * `:name` - registered name of the supervisor.
  """

  use Supervisor

  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(opts) do
    job =
      Keyword.get(opts, :job) ||
        raise ArgumentError, "UffPort.JobSupervisor needs :job (train args)"

    unless is_map(job),
      do: raise(ArgumentError, ":job must be a map of train args, got #{inspect(job)}")

    Supervisor.start_link(__MODULE__, opts, Keyword.take(opts, [:name]))
  end

  @impl true
  def init(opts) do
    # The ledger lives in the supervisor, so it outlives every worker it restarts.
    ledger = :ets.new(:uff_port_ledger, [:set, :public])

    worker_opts =
      Keyword.get(opts, :worker, [])
      |> Keyword.merge(job: Keyword.fetch!(opts, :job), ledger: {ledger, :worker}, id: :worker)
      |> then(fn w -> if b = opts[:backoff], do: Keyword.put(w, :backoff, b), else: w end)

    Supervisor.init([{UffPort.Worker, worker_opts}],
      strategy: :one_for_one,
      max_restarts: Keyword.get(opts, :max_restarts, 3),
      max_seconds: Keyword.get(opts, :max_seconds, 60)
    )
  end

  @doc "The current worker pid, or nil while it is being restarted."
  @spec worker(Supervisor.supervisor()) :: pid | nil
  def worker(sup) do
    Enum.find_value(Supervisor.which_children(sup), fn
      {:worker, pid, _, _} when is_pid(pid) -> pid
      _ -> nil
    end)
  end
end
