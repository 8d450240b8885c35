defmodule UffPort.RestartLedger do
  @moduledoc """
  Restart backoff for a supervised worker. The ledger is an ETS table owned by
  the supervisor (`UffPort.JobSupervisor`), so it outlives every worker it
  restarts; a worker records each start in `init/1` and sleeps there first when
  the previous start was not healthy. Sleeping in `init/1` delays the
  supervisor's restart itself, which is the point: a worker that dies on start
  (bad CUDA, OOM at load) is retried at `base`, 2x, 4x, ... up to `max` ms, not
  in a hot loop, until the supervisor's restart intensity gives up.

  Healthy = stayed up `healthy_after` ms, or advanced a training step: a worker
  that crashes mid-run is restarted at once.
  """

  require Logger

  @type t :: {:ets.tid(), term}

  @doc "Records a start; sleeps the backoff first when due. Returns the attempt number (1, 2, ...)."
  @spec begin_attempt(t, keyword) :: pos_integer
  def begin_attempt({tid, key}, backoff) do
    now = System.monotonic_time(:millisecond)
    healthy_after = Keyword.fetch!(backoff, :healthy_after)
    attempt = :ets.update_counter(tid, {key, :attempts}, 1, {{key, :attempts}, 0})
    healthy? = :ets.lookup(tid, {key, :healthy}) == [{{key, :healthy}, true}]

    fast =
      case :ets.lookup(tid, {key, :last_start}) do
        [{_, last}] when now - last < healthy_after and not healthy? ->
          :ets.update_counter(tid, {key, :fast}, 1, {{key, :fast}, 0})

        _ ->
          :ets.insert(tid, {{key, :fast}, 0})
          0
      end

    if fast > 0 do
      delay = min(backoff[:base] * Integer.pow(2, fast - 1), backoff[:max])

      Logger.warning(
        "uff_port worker restarting quickly (#{fast} in a row): backing off #{delay} ms"
      )

      Process.sleep(delay)
    end

    :ets.insert(tid, [
      {{key, :last_start}, System.monotonic_time(:millisecond)},
      {{key, :healthy}, false}
    ])

    attempt
  end

  @doc "Marks the current start healthy (it advanced a training step)."
  @spec mark_healthy(t) :: true
  def mark_healthy({tid, key}), do: :ets.insert(tid, {{key, :healthy}, true})
end
