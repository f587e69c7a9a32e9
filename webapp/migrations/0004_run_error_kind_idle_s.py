from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("webapp", "0003_run_phase_device_check"),
    ]

    operations = [
        migrations.AddField(
            model_name="run",
            name="error_kind",
            field=models.CharField(
                blank=True,
                choices=[
                    ("input", "the model, dataset or settings"),
                    ("device", "the hardware target"),
                    ("worker", "the worker stopped"),
                    ("internal", "an internal error"),
                ],
                help_text="why a failed run failed: resuming helps after device, worker and internal errors, not input",
                max_length=16,
            ),
        ),
        migrations.AddField(
            model_name="run",
            name="idle_s",
            field=models.FloatField(
                default=0.0, help_text="seconds the run spent stopped (cancelled or failed) before a resume"
            ),
        ),
    ]
