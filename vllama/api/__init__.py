"""Thin HTTP routers: `openai` (proxied model routes), `admin` (what the CLI calls)."""
