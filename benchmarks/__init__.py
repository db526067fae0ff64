"""Benchmarks: resilgate beside nginx and a bare aiohttp proxy, on the same upstreams."""
