"""The ORM tables, one module per capability: the lowest layer of the capability packages
(every capability may read any table; see docs/architecture.md, "Dependency direction")."""
