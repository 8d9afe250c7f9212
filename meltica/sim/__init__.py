"""The simulation core: the one place that says how a simulated venue moves and what it is set to.

* ``meltica.sim.config`` — ``SimulatedVenueSettings``: fees, fill model, latency and balances of a
  simulated account, and their one conversion into the matching engine's ``FeeSchedule`` / ``FillModel``
  (``BacktestConfig`` and the live pipeline's ``AccountVenueConfig`` are both such settings);
* ``meltica.sim.step`` — ``BarStep``: a bar's open printed (its volume share sizing the synthetic book),
  its intrabar path, the expiry of GTD orders at its close;
* ``meltica.sim.venue`` — ``SimulatedVenue``: one account on an ``InProcessVenue`` whose user
  stream reaches its owner before each call returns, stepped by a ``BarStep``;
* ``meltica.sim.executor`` — ``HeldRequest`` / ``RequestExecutor``: a strategy's request, held until its
  arrival, then carried out through the OMS and the local order emulation;
* ``meltica.sim.store`` — ``NotifyingOrderStore``: an order store that tells its owner every change.

The backtest engine, the live pipeline's simulated venue driver and lock-step mode and the Binance emulator call
these; nothing here knows which of them is running. The package itself imports nothing, so the emulator
(which needs only the bar step) does not load the OMS.
"""
