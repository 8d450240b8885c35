# Tests spawn the real Python worker: UFF_PORT_PYTHON points at the venv that has
# uff-port installed (CI sets it); otherwise the repository's own .venv is used.
unless System.get_env("UFF_PORT_PYTHON") do
  venv = Path.expand("../../.venv/bin/python", __DIR__)
  if File.exists?(venv), do: System.put_env("UFF_PORT_PYTHON", venv)
end

# The week-long campaign drill (minutes): `mix test --include campaign_long test/campaign_test.exs`
# (scripts/test.sh runs it).
ExUnit.start(capture_log: true, exclude: [:campaign_long])
