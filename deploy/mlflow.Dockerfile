# MLflow tracking server with the PostgreSQL driver and S3 (MinIO) support.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1
RUN pip install "mlflow>=3.1,<4" "psycopg2-binary>=2.9" "boto3>=1.34"
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
