"""Delivery: scheduler, resolver, SMTP client, DSN."""
