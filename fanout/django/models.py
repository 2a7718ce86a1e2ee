"""The outbox table as a model, to look at pending rows (``OutboxRow.objects.count()``); rows are written by
``fanout.django.outbox`` and deleted by the relay, never through this model."""

from django.contrib.postgres.fields import ArrayField
from django.db import models


class OutboxRow(models.Model):
    id = models.BigAutoField(primary_key=True)
    seq = models.BigIntegerField(null=True, help_text="commit order, set at COMMIT")
    txid = models.BigIntegerField()
    call = models.TextField(help_text="the ServerUtil call")
    args = models.TextField(help_text="its arguments (JSON)")
    shards = ArrayField(models.SmallIntegerField())
    created_at = models.DateTimeField()

    class Meta:
        managed = False  # the migration creates it with fanout.outbox.schema_sql (trigger, sequence, indexes)
        db_table = "fanout_outbox"
        verbose_name = "outbox row"

    def __str__(self) -> str:
        return f"{self.call} #{self.id}"
