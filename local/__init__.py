"""The composition package: the only code that imports both ``gateway`` and ``trainer``.

It holds what composes the two sides in one process tree: the all-in-one local gateway
(``gateway serve``: Ray, the Serve app and the repair watcher) and the demo's attacker
stream and table. Everything else keeps to its side; ``make lint`` checks it.
"""
