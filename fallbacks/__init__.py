"""The hospital's degraded paths (self-pay, local queue, stale cache, journal, notice).

Route tables name these fallbacks; the engine in :mod:`resilgate` runs them when no
endpoint of a route's upstream can serve.
"""
