"""Test helpers: a fake vLLM server (`python -m vllama.testing.fake_engine`) with a simulated GPU ledger."""
