"""Webhooks (spec 15.6): tenant and platform endpoints, the outbox of events written in the
transaction of each change, and the delivery loop that runs beside every dispatcher.

A lower layer: ``pie.jobs``, ``pie.assignments`` and ``pie.registry`` call ``pie.webhooks.outbox``
where their changes happen; nothing here imports them back.
"""
