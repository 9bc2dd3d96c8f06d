"""Ablation lab: tasks (MQAR recall, attention-sink share) and, later, sweep definitions and recorded results."""
