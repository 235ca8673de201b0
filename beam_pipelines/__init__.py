"""Apache Beam pipelines: ingestion of medical images into de-identified, patient-split TFRecords."""
