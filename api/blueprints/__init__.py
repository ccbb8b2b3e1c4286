"""One blueprint per resource; each module's `blueprint(settings)` builds a fresh one."""
