"""The week's training campaign: spec validation, placement and the journal reader.

The campaign itself runs in Elixir (`UffPort.Campaign`, docs/campaign.md); this
package is what it asks of the worker (`campaign_plan`, `campaign_release`) and
what `uff-port campaign status` reads. Torch-free.
"""
