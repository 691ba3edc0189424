"""Latency: trtexec's protocol, the same for every backend (import from the module).

* :mod:`~cascadec.profile.protocol`: how a number is taken (warm-up, timed loop, percentiles,
  the protocol record, interleaved rounds, speed-ups); knows nothing of backends;
* :mod:`~cascadec.profile.engines`: which runner each backend of the registry times, on CPU
  (wall time of a call) or GPU (host latency and compute time from a device runner).
"""
