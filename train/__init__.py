"""Training code for the ICH classifier (``triage-node train`` / ``evaluate``).

Empty until the training issue lands; it will import only preprocess, model, config and
store from :mod:`triage_node` - never the SCP or the API.
"""
