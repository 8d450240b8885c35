# Runs `UffPort.CampaignCLI` in a VM of its own (the whole-VM kill drill):
#   elixir -pa EBIN campaign_runner.exs run SPEC --runs-root DIR --python PY
System.halt(UffPort.CampaignCLI.main(System.argv()))
