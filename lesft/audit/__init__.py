"""Privacy audit: what a curious split server can reconstruct from what it receives.

- :mod:`lesft.audit.view` -- record the server's view of a run (every ``Activations`` message the server
  receives), kept apart from the client's truth, which only the scorer reads.
- :mod:`lesft.audit.attacks` -- the attacks: (a) labels in clear, (b) nearest neighbour against hidden
  states the attacker computes with the base weights, (c) a learned (linear) inverter; and their scores.
- :mod:`lesft.audit.run` -- ``lesft audit``: the sweep over split points and defences, its report.
"""
