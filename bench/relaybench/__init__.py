"""relaybench: relayd against Postfix and Exim on one machine, interleaved.

`bench/run` is the one command; `harness.py` is the orchestrator. Nothing
here is imported by relayd or by its test suite (except the smoke test that
runs `bench/run --smoke` as a subprocess).
"""
