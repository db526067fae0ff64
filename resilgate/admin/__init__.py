"""The admin API: its own listener, bearer tokens with roles, every change audited."""
