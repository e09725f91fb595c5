-- One PostgreSQL instance, two databases: the cnp job store and MLflow's backend.
CREATE DATABASE mlflow OWNER cnp;
