"""Public test doubles, opt-in: import them explicitly (nothing here is a pytest plugin or loaded on its own).

- :mod:`bridge.testing.engine`: ``TestEngine``, a protocol-faithful iii engine on a loopback port
  (``python -m bridge.testing.engine`` serves one from a process of its own).
- :mod:`bridge.testing.consumer`: ``Consumer``, a worker on the real iii-sdk that registers and binds functions.
- :mod:`bridge.testing.sink`: ``MemorySink``, for driving a source without the runtime.
- :mod:`bridge.testing.waiting`: the polling helpers they use.
"""
