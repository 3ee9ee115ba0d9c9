"""The operations users call: inspect, plan, verify, push, demo, calibrate, eval. Nothing below
imports them."""
