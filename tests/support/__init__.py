"""Helpers shared by the tests, each defined once here (test files import them; none redefines one).

- ``net``: a free TCP port on the loopback interface.
- ``polling``: bounded waiting for a condition.
- ``cluster``: real pd processes (``pd_serve``, and ``Cluster``, started process by process so that a
  test can kill, hang, resume or restart any one), health waits, and the page, room and memory checks
  read from a deployment.
- ``clients``: HTTP clients of a deployment: completion bodies, streamed requests that record what came
  back (``Outcome``), abandoned requests, bursts, random aborts, and the openai client helpers.
- ``oracle``: transformers as the oracle (loading, greedy tokens) and ``rel_err``.
- ``certs``: test certificates made with the openssl command (a CA, a certificate it signed, and an
  unrelated CA's for peers that must be refused).
- ``checkpoints``: a copy of a checkpoint directory with edited tensors or JSON files.
- ``transfer_peer``: one rank's KV data plane in its own process (run as a script) and ``Peer``, the
  test side that drives it.
"""
