"""Creates the outbox table with the SQL of ``fanout outbox init`` (PostgreSQL only)."""

from typing import Any

from django.contrib.postgres.fields import ArrayField
from django.db import migrations, models

from fanout.outbox import DEFAULT_TABLE, drop_sql, schema_sql


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        raise RuntimeError(
            f"fanout.django's outbox needs PostgreSQL; database {schema_editor.connection.alias!r} is "
            f"{schema_editor.connection.vendor}"
        )
    schema_editor.execute(schema_sql(DEFAULT_TABLE), params=None)


def drop(apps: Any, schema_editor: Any) -> None:
    schema_editor.execute(drop_sql(DEFAULT_TABLE), params=None)


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(create, drop)],
            state_operations=[
                migrations.CreateModel(
                    name="OutboxRow",
                    fields=[
                        ("id", models.BigAutoField(primary_key=True, serialize=False)),
                        ("seq", models.BigIntegerField(null=True, help_text="commit order, set at COMMIT")),
                        ("txid", models.BigIntegerField()),
                        ("call", models.TextField(help_text="the ServerUtil call")),
                        ("args", models.TextField(help_text="its arguments (JSON)")),
                        ("shards", ArrayField(models.SmallIntegerField(), size=None)),
                        ("created_at", models.DateTimeField()),
                    ],
                    options={"managed": False, "db_table": "fanout_outbox", "verbose_name": "outbox row"},
                ),
            ],
        ),
    ]
