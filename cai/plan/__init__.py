"""The plan of a command: its steps, each with everything it runs with, checked before
any work (`cai.plan.plan.make_plan`). Pure: no weights, no network, no writes."""
