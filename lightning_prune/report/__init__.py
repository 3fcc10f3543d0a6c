"""``lightning-prune report``: an HTML report of fit runs and exports (see ``docs/report.md``).

``runs`` finds and reads the folders, ``masks`` summarizes what a mask keeps, ``plots`` draws
the figures with matplotlib, ``document`` assembles the page and ``command`` is the subcommand.
"""
