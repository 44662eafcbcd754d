"""LLM side of rllib-sppo: offline model assets."""
